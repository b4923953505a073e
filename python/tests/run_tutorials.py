"""Runs tutorial scripts one after another in this one Python process, each as ``python SCRIPT
ARGS...`` would run it (``__main__``, its own ``sys.argv`` and working directory), its standard
output and error (file descriptors 1 and 2, so that native code's lines are kept too) written to
files of its own. One process for all of them: scanpy, torch and the package are imported once,
and numba compiles UMAP's and the neighbour graph's functions once (it does not cache them on
disk), which is most of a short tutorial's time.

usage: python run_tutorials.py PLAN.json
PLAN.json: a list of {"script", "args", "cwd", "stdout", "stderr", "status"}; each run writes its
exit status (0, a ``SystemExit`` code, or 1 for an exception, whose traceback ends its stderr) to
its "status" file. Exits 0 once every script has run, whatever they returned.

``TUTORIAL_UMAP_EPOCHS`` (environment): the layout epochs of scanpy's ``sc.tl.umap`` where a script
does not choose them (UMAP's own default is 500 for fewer than 10,000 cells). The tutorials draw
UMAPs of the model's latents; the layout is scanpy's work, not the package's under test, and at
its default it was a third of the four tutorials' time (36 of 120 s on 2 cores)."""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def _run(script: str, args: list[str], cwd: str) -> int:
    os.chdir(cwd)
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - the script's failure is its result, reported in its stderr
        traceback.print_exc()
        return 1
    return 0


def _cap_umap_epochs(epochs: int) -> None:
    """``sc.tl.umap`` with ``maxiter=epochs`` unless the caller gives it."""
    import functools

    try:
        import scanpy as sc
    except ImportError:
        return
    full = sc.tl.umap

    @functools.wraps(full)
    def umap(*args, **kwargs):
        kwargs.setdefault("maxiter", epochs)
        return full(*args, **kwargs)

    sc.tl.umap = umap


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    if os.environ.get("TUTORIAL_UMAP_EPOCHS"):
        _cap_umap_epochs(int(os.environ["TUTORIAL_UMAP_EPOCHS"]))
    home = os.getcwd()
    for item in plan:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(item["stdout"], "w") as out, open(item["stderr"], "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                status = _run(item["script"], item["args"], item["cwd"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
                os.chdir(home)
        try:
            import matplotlib.pyplot as plt

            plt.close("all")
        except ImportError:
            pass
        with open(item["status"], "w") as f:
            f.write(str(status))


if __name__ == "__main__":
    main()
