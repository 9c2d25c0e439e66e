#!/usr/bin/env python
"""The demo (or any command) on a CPU that other programs share: wall time idle and beside 1, 2, ... CPU-bound
processes, for each thread setting, and its ratio to the idle run of the same setting.

    python bench/cpu_load.py                          # the whole demo (scripts/demo.sh), loads 0, 1, 2
    python bench/cpu_load.py --what train --steps 300 # the demo's LDM training alone (main.py), faster
    python bench/cpu_load.py --variants default,OMP_NUM_THREADS=2 --what train
    python bench/cpu_load.py --quick                  # seconds: the harness on a tiny command (the tests run it)

A competitor is a single-threaded pure-Python busy loop, started before the command and killed after it. Each
variant is an environment setting for the command (``default``: nothing set, i.e. the project's ``--threads auto``; or
``NAME=VALUE[+NAME=VALUE]``). Runs are interleaved (variant by variant within each load, repetition by repetition).
Fair share: were the cores split equally among all runnable threads, a command keeping ``n = min(threads, P)``
of ``P`` cores busy beside ``k`` single-threaded competitors would take ``max(1, (n + k) / P)`` times its idle time
(one thread beside one competitor on two cores: 1.0, it still has a core; two threads: 1.5). Issue 32's target: at
most 1.25x the fair share of the two-thread run (1.9x the idle time beside one process, 2.5x beside two). The
table also gives each run against the fastest idle run of all variants, so a setting that is slower when the
machine is idle does not look good for that reason alone.

Writes ``bench/out/cpu_load[_quick].json`` and ``.md`` (``--out`` changes the JSON path).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ldm.threads import num_cores as process_cores  # noqa: E402

OUT_DIR = os.path.join(ROOT, "bench", "out")
BUSY_LOOP = "while True: pass"


def fair_share_ratio(threads: int, competitors: int, num_cores: int) -> float:
    """Slow-down of a ``threads``-thread CPU-bound command beside ``competitors`` single-threaded ones on
    ``num_cores`` cores when every runnable thread gets an equal share (1 when nothing needs to wait)."""
    if threads < 1 or competitors < 0 or num_cores < 1:
        raise ValueError(f"threads >= 1, competitors >= 0, cores >= 1 expected, got {threads}, {competitors}, "
                         f"{num_cores}")
    used = min(threads, num_cores)  # cores the command keeps busy when alone
    runnable = used + competitors
    share = used * min(1.0, num_cores / runnable)  # cores it gets under an equal split
    return used / share


def parse_variant(text: str) -> dict[str, str]:
    """``default`` -> {} ; ``A=1+B=2`` -> {"A": "1", "B": "2"}."""
    if text == "default":
        return {}
    env = {}
    for part in text.split("+"):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise ValueError(f"variant {text!r}: expected 'default' or NAME=VALUE[+NAME=VALUE]")
        env[name] = value
    return env


def variant_threads(env: dict[str, str], num_cores: int) -> int:
    """Threads per process of a variant's command: its ``OMP_NUM_THREADS`` (or the caller's); else the project's
    default, ``--threads auto``, which uses up to every core (``ldm.threads``)."""
    value = {**os.environ, **env}.get("OMP_NUM_THREADS") or ""
    return int(value) if value.isdigit() and int(value) > 0 else num_cores


def _command(args: argparse.Namespace, work: str) -> tuple[list[str], dict[str, str]]:
    python = sys.executable
    if args.what == "command":
        return ["bash", "-c", args.command], {}
    if args.what == "demo":
        env = {"PYTHON": python, "LOGDIR": os.path.join(work, "logs")}
        env.update({k: v for k, v in os.environ.items() if k.startswith("DEMO_") or k == "AE_ARGS"})
        return ["bash", os.path.join(ROOT, "scripts", "demo.sh")], env
    # train: the demo's anatomical LDM, on the autoencoder that --ae_ckpt names (trained once when absent)
    return [python, "main.py", "--base", "configs/latent-diffusion/demo_phantom_anatomical.yaml", "-t", "-n",
            "load", "-l", os.path.join(work, "logs"), "--accelerator", "cpu",
            f"model.params.first_stage_config.params.ckpt_path={args.ae_ckpt}",
            f"lightning.trainer.max_steps={args.steps}", "lightning.trainer.enable_progress_bar=false"], {}


def _ensure_autoencoder(args: argparse.Namespace, work: str) -> None:
    if args.what != "train" or (args.ae_ckpt and os.path.isfile(args.ae_ckpt)):
        return
    if args.ae_ckpt:
        raise FileNotFoundError(f"--ae_ckpt {args.ae_ckpt} does not exist")
    logdir = os.path.join(work, "ae")
    print("training the demo autoencoder once (the timed runs reuse it)", flush=True)
    subprocess.run([sys.executable, "main.py", "--base", "configs/autoencoder/demo_phantom_kl.yaml", "-t", "-n", "ae",
                    "-l", logdir, "--accelerator", "cpu", "lightning.trainer.enable_progress_bar=false"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = sorted(os.listdir(logdir))
    args.ae_ckpt = os.path.join(logdir, runs[-1], "checkpoints", "last.ckpt")


def run_once(cmd: Sequence[str], env: dict[str, str], competitors: int, log_path: str) -> dict[str, Any]:
    """Wall time of ``cmd`` beside ``competitors`` busy loops; the phases ('== ' lines) it printed, timed."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(competitors)]
    try:
        time.sleep(0.5 if competitors else 0.0)  # the loops are running before the command starts
        t0 = time.perf_counter()
        phases: list[tuple[str, float]] = []
        with open(log_path, "w") as log:
            proc = subprocess.Popen(list(cmd), cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                    stderr=log, text=True)
            for line in proc.stdout:
                log.write(line)
                if line.startswith("== "):
                    phases.append((line[3:].strip(), time.perf_counter() - t0))
            rc = proc.wait()
        wall = time.perf_counter() - t0
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; see {log_path}")
    return {"wall_s": wall, "phases": [{"phase": name, "start_s": start} for name, start in phases]}


def summarise(rows: list[dict[str, Any]], num_cores: int) -> list[dict[str, Any]]:
    """Median wall time per (variant, load): its ratio to the variant's idle median, to the fastest idle median of
    all variants, and to the fair share."""
    out = []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    loads = sorted({r["competitors"] for r in rows})
    idle = {v: statistics.median([r["wall_s"] for r in rows if r["variant"] == v and r["competitors"] == 0])
            for v in variants}
    best_idle = min(idle.values())
    for variant in variants:
        threads = next(r["threads"] for r in rows if r["variant"] == variant)
        for k in loads:
            walls = [r["wall_s"] for r in rows if r["variant"] == variant and r["competitors"] == k]
            if not walls:
                continue
            med = statistics.median(walls)
            fair = fair_share_ratio(threads, k, num_cores)
            ratio = med / idle[variant]
            out.append({"variant": variant, "threads": threads, "competitors": k, "runs": len(walls),
                        "wall_s_median": med, "wall_s": walls, "ratio_to_idle": ratio,
                        "ratio_to_fastest_idle": med / best_idle, "fair_share_ratio": fair,
                        "ratio_to_fair_share": ratio / fair, "within_1_25x_fair": ratio <= 1.25 * fair})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command_line']}` ({result['what']}; {result['machine']}, {result['cores']} cores, "
             f"{result['date']})", "",
             "| variant | threads | other CPU-bound processes | runs | wall s (median) | ratio to idle | "
             "ratio to fastest idle | fair-share ratio | ratio / fair | within 1.25x fair |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['variant']} | {r['threads']} | {r['competitors']} | {r['runs']} | {r['wall_s_median']:.1f} |"
                     f" {r['ratio_to_idle']:.2f} | {r['ratio_to_fastest_idle']:.2f} | {r['fair_share_ratio']:.2f} | {r['ratio_to_fair_share']:.2f} | "
                     f"{'yes' if r['within_1_25x_fair'] else 'no'} |")
    return "\n".join(lines) + "\n"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("demo", "train", "command"), default="demo",
                   help="demo: scripts/demo.sh (DEMO_* and AE_ARGS from the environment are passed on); train: the "
                        "demo's LDM training alone; command: --command")
    p.add_argument("--command", default=None, help="shell command for --what command")
    p.add_argument("--steps", type=int, default=300, help="LDM steps of --what train")
    p.add_argument("--ae_ckpt", default=None, help="autoencoder of --what train (default: trained once, ~1.5 min)")
    p.add_argument("--loads", default="0,1,2", help="numbers of competing busy-loop processes")
    p.add_argument("--variants", default="default",
                   help="comma-separated: 'default' (the project's thread default) or NAME=VALUE[+NAME=VALUE] "
                        "environment settings, e.g. OMP_NUM_THREADS=2")
    p.add_argument("--reps", type=int, default=1, help="runs per (variant, load)")
    p.add_argument("--quick", action="store_true", help="a tiny torch command, loads 0 and 1 (seconds)")
    p.add_argument("--out", default=None, help="JSON path (default bench/out/cpu_load[_quick].json)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if args.quick:
        args.what = "command"
        args.command = (f"{sys.executable} -c \"import torch; torch.set_num_threads(1); "
                        "a = torch.randn(256, 256); [a @ a for _ in range(300)]\"")
        args.loads = "0,1"
    if args.what == "command" and not args.command:
        raise SystemExit("cpu_load.py: error: --what command needs --command")
    loads = [int(x) for x in args.loads.split(",") if x.strip()]
    if not loads or min(loads) < 0 or 0 not in loads:
        raise SystemExit("cpu_load.py: error: --loads must list competitor counts >= 0 and include 0 (the idle run)")
    variants = {v: parse_variant(v) for v in args.variants.split(",") if v.strip()}
    cores = process_cores()
    out = args.out or os.path.join(OUT_DIR, "cpu_load_quick.json" if args.quick else "cpu_load.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    work = tempfile.mkdtemp(prefix="cpu_load_")
    rows = []
    try:
        _ensure_autoencoder(args, work)
        for rep in range(args.reps):
            for k in loads:
                for name, env in variants.items():
                    run_dir = os.path.join(work, f"{len(rows)}")
                    os.makedirs(run_dir)
                    cmd, cmd_env = _command(args, run_dir)
                    res = run_once(cmd, {**cmd_env, **env}, k, os.path.join(run_dir, "stderr.log"))
                    threads = variant_threads(env, cores)
                    rows.append({"variant": name, "threads": threads, "competitors": k, "rep": rep, **res})
                    print(f"{name:>24}  competitors {k}  rep {rep}: {res['wall_s']:.1f} s", flush=True)
                    if args.what != "train":
                        shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"what": args.what, "command_line": "python bench/cpu_load.py " + " ".join(argv or sys.argv[1:]),
              "machine": platform.processor() or platform.machine(), "cores": cores,
              "date": time.strftime("%Y-%m-%d"), "loads": loads, "variants": list(variants),
              "demo_env": {k: v for k, v in os.environ.items() if k.startswith("DEMO_")},
              "rows": rows, "summary": summarise(rows, cores)}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
