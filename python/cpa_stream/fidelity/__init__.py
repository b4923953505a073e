"""The fidelity harness: cpa-stream and cpa-tools trained on the same cells with the
same hyper-parameters, scored by one definition. `scripts/fidelity.sh` drives it; each step can
also be run by hand, as `python -m cpa_stream.fidelity COMMAND`.

  prepare  H5AD DIR [--split random|combos|celltype] [--heldout-value V]
                                              one split column (`fidelity_split`) written into
           DIR/data.h5ad (imported into DIR/data.store on first use); DIR/meta.json the keys.
           `celltype`: one covariate value's perturbed cells of every condition another value
           also has are test cells, none of them trained on (the unseen cell type task); the
           value is V, else the one with most such cells
  peer     DIR --epochs E --seed S            cpa-tools via ../shared/peer/cpa-tools/run_peer.py
                                              (through peer_anchor.py: also cpa-tools-delta, the
                                              anchored prediction)
  stream   DIR --epochs E --seed S --variant V [--set KEY=VALUE ...]
                                              cpa-stream with the translated configuration
  rescore  DIR [--variants V,...]              finished cpa-stream runs scored again with the
           [--space expected|mean]            expected log1p of the predicted NB (VARIANT-elog),
           [--controls drawn|all] [--anchor]  every control cell (-allctrl), anchored on the
                                              observed controls (-delta)
  draws    DIR --epochs E [--variant V] [--against cpa-tools]
                                              each seed's model scored with every seed's
                                              control-cell draws: the spread over seeds split
                                              into the training's part and the draws' part
  table    DIR                                 means and spreads over seeds, as Markdown
  slopes   DIR --variant V --epochs E --seed S [--covariate C]
                                              per test group of covariate value C (default the
                                              held-out one): how much of the real change on the
                                              top-20 DEGs the anchored prediction and the shift
                                              baseline recover (slope), and their R2
  calibrated DIR [DIR ...]                    per celltype split: the transfer slope (a
                                              condition's training shift in one covariate value
                                              regressed on its mean shift in the others) and the
                                              shift baseline scaled by it, beside the shift
                                              baseline and the control mean

Scoring (`score`, the definitions of run_peer.py, applied to both tools' predicted group means):
the test cells of each perturbed group (covariates | condition | dose, at least 2 test cells);
counterfactual predictions decode, for each test cell, a control cell of the same covariates
drawn with numpy's `default_rng(seed)` in test-cell order (run_peer.py's draws, so both tools
decode the same cells); recon decodes each test cell itself. Means of log1p values (count
models). R2 is sklearn's (1 - SS_res / SS_tot over genes) of the true test-cell mean against the
predicted mean over all genes (`all`), over the 20 genes with the largest |group mean - control
mean| over all the group's cells (`deg`), and of the change vs the control mean of the
covariates (`change`, all genes). The control-mean baseline predicts the control mean itself.
"""

from .data import (
    DRAW_METRICS, N_TOP_DEG, PAIRED_METRICS, PROTOCOL_METRICS, SPLIT, binary, cf_draws, covariate_keys, group_keys,
    log_values, peer_dir, peer_defaults, prepare, read_meta, set_key, toml_text, translate,
)
from .scores import calibrated, change_reproducibility, r2, score, slopes, train_shift, transfer_slope
from .report import best_epoch, paired, paired_lines, print_result, protocol, reproducibility_lines, table
from .tools import (
    control_means, draw_grid, draws, ensemble, expected_log1p_nb, group_covariates, peer, predict_groups,
    read_log_theta, rescore, stream,
)
from .cli import main
