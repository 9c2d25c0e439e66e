#!/usr/bin/env python
"""The report of a pre-registered arm addendum to benchmark v2 (e.g. ``bench/PROTOCOL_REPA.md``): seed-level paired
tests of new arms against the base protocol's, from the base protocol's own records, written only when every arm
of the addendum has every training seed.

    python bench/arm_addendum.py --addendum bench/PROTOCOL_REPA.md                  # bench/records/v2_cpu_claim
    python bench/arm_addendum.py --addendum A.md --records DIR -o OUT --partial-report

The addendum's JSON block names the base protocol hash, the instrument (``setup_id``), each arm with the
``config_sha`` its records must carry (``null``: any), the training seeds, the primary contrasts
``[arm, baseline, budget]`` and samplers (Holm over them) and secondary ones (unadjusted, labelled so). A record of
another instrument, protocol or configuration is refused, naming it. Output: ``<name>.json`` and ``<name>.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import records as rec  # noqa: E402
from anatomy_stats import holm, mean_interval  # noqa: E402
from anatomy_v2_report import _paired, _per_seed  # noqa: E402

KEYS = ("addendum", "name", "version", "base_protocol_hash", "setup_id", "arms", "training_seeds", "primary",
        "secondary")
CLAIM_RECORDS = os.path.join(HERE, "records", "v2_cpu_claim")


def load_arm_addendum(path: str) -> dict[str, Any]:
    """The addendum's JSON block, checked for its keys and that its contrasts name its arms."""
    block = rec.json_block(path, "addendum")
    missing = [k for k in KEYS if k not in block]
    if missing or block.get("addendum") != "anatomy-v2-arm":
        raise ValueError(f"{path}: not an arm addendum (needs \"addendum\": \"anatomy-v2-arm\" and {list(KEYS)}; "
                         f"missing {missing})")
    named = {a for part in ("primary", "secondary") for c in block[part]["contrasts"] for a in c[:2]}
    if named - set(block["arms"]):
        raise ValueError(f"{path}: contrasts name arms {sorted(named - set(block['arms']))} not in \"arms\"")
    return block


def select(collected: dict[str, Any], addendum: dict[str, Any]) -> list:
    """The records of the addendum's arms, seeds and instrument; a record of an arm with another ``config_sha``
    than the addendum fixes is a ValueError naming it."""
    kept = []
    for record, arrays in collected["records"]:
        arm, seed = record["arm"], record["training_seed"]
        if arm not in addendum["arms"] or seed not in addendum["training_seeds"]:
            continue
        if record["setup_id"] != addendum["setup_id"]:
            continue  # another instrument's records do not pair with these
        want, got = addendum["arms"][arm], record["model"].get("config_sha")
        if want is not None and got != want:
            raise ValueError(f"the record of {arm} seed {seed} has config_sha {got}; the addendum fixes {want} "
                             "(the arm changed after it was pre-registered)")
        kept.append((record, arrays))
    return kept


def _tests(records: list, contrasts: list, samplers: list) -> dict[str, dict[str, Any]]:
    out = {}
    for a, b, budget in contrasts:
        for sampler in samplers:
            res = _paired(_per_seed(records, f"{budget}/{sampler}"), a, b)
            out[f"{a} - {b} ({budget}, {sampler})"] = res or {"n": 0, "diff": None, "p": None, "seeds": []}
    return out


def addendum_report(collected: dict[str, Any], addendum: dict[str, Any]) -> dict[str, Any]:
    """Means per arm and key, the primary tests (Holm) and the secondary ones, and which seeds are complete."""
    records = select(collected, addendum)
    seeds = {arm: sorted({r["training_seed"] for r, _ in records if r["arm"] == arm}) for arm in addendum["arms"]}
    keys = sorted({f"{c[2]}/{s}" for part in ("primary", "secondary") for c in addendum[part]["contrasts"]
                   for s in addendum[part]["samplers"]})
    per_key = {k: _per_seed(records, k) for k in keys}  # once per key, not once per (arm, key)
    means = {arm: {k: mean_interval(list(per_key[k].get(arm, {}).values())) for k in keys} for arm in addendum["arms"]}
    primary = _tests(records, addendum["primary"]["contrasts"], addendum["primary"]["samplers"])
    for name, p in holm({k: v.get("p") for k, v in primary.items()}).items():
        primary[name]["p_holm"] = p
    secondary = _tests(records, addendum["secondary"]["contrasts"], addendum["secondary"]["samplers"])
    missing = {arm: sorted(set(addendum["training_seeds"]) - set(s)) for arm, s in seeds.items()}
    missing = {arm: m for arm, m in missing.items() if m}
    return {"addendum_hash": rec.canonical_hash(addendum), "name": addendum["name"], "seeds": seeds,
            "means": means, "primary": primary, "secondary": secondary, "missing": missing,
            "is_claim": not missing, "alpha": float(addendum["primary"]["alpha"])}


def markdown(report: dict[str, Any], addendum: dict[str, Any]) -> str:
    def pct(x: Optional[float], signed: bool = False) -> str:
        return "-" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")

    status = ("the pre-registered claim: every arm has every seed" if report["is_claim"] else
              "partial, not a claim: missing " + "; ".join(f"{a} {m}" for a, m in report["missing"].items()))
    lines = [f"# Arm addendum `{report['name']}` ({status})", "",
             f"Addendum hash {report['addendum_hash']}, base protocol {addendum['base_protocol_hash']}, instrument "
             f"{addendum['setup_id']}; pass rate of judge A at the primary minimum size, mean over training seeds "
             "[95 % t].", "", "| arm | seeds | " + " | ".join(next(iter(report["means"].values()))) + " |",
             "|---|---|" + "---|" * len(next(iter(report["means"].values())))]
    for arm, by_key in report["means"].items():
        cells = [f"{pct(m['mean'])} [{pct(m.get('lo'))}, {pct(m.get('hi'))}]" for m in by_key.values()]
        lines.append(f"| {arm} | {report['seeds'][arm]} | " + " | ".join(cells) + " |")
    for title, table, holm_col in (("Primary (Holm over the family)", report["primary"], True),
                                   ("Secondary (unadjusted)", report["secondary"], False)):
        lines += ["", f"{title}: seed-level paired differences, points:", "",
                  "| contrast | seeds | difference [95 % t] | p" + (" | p (Holm)" if holm_col else "") + " |",
                  "|---|---|---|---" + ("|---" if holm_col else "") + "|"]
        for name, t in table.items():
            ci = "" if t.get("lo") is None else f" [{pct(t['lo'], True)}, {pct(t['hi'], True)}]"
            p = "-" if t.get("p") is None else f"{t['p']:.4f}"
            row = f"| {name} | {len(t.get('seeds') or [])} | {pct(t.get('diff'), True)}{ci} | {p}"
            if holm_col:
                row += " | " + ("-" if t.get("p_holm") is None else f"{t['p_holm']:.4f}")
            lines.append(row + " |")
    significant = [n for n, t in report["primary"].items() if t.get("p_holm") is not None
                   and t["p_holm"] < report["alpha"]]
    lines += ["", "Significant after Holm: " + (", ".join(significant) if significant else "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addendum", required=True, help="the addendum's Markdown file (its JSON block)")
    p.add_argument("--records", default=CLAIM_RECORDS, help="records folder (default bench/records/v2_cpu_claim)")
    p.add_argument("-o", "--out", default=None, help="output folder (default bench/<name>_claim)")
    p.add_argument("--partial-report", "--partial_report", dest="partial", action="store_true",
                   help="write the report before every arm has every seed (marked partial)")
    args = p.parse_args(argv)
    from trained_v2 import write_study

    try:
        addendum = load_arm_addendum(args.addendum)
        collected = rec.collect([args.records], addendum["base_protocol_hash"])
        report = addendum_report(collected, addendum)
    except (ValueError, FileNotFoundError) as err:
        print(f"arm_addendum.py: error: {err}", file=sys.stderr)
        return 2
    if not (report["is_claim"] or args.partial):  # nobody reads a claim before its end
        print(f"arm_addendum.py: {sum(map(len, report['seeds'].values()))} records of "
              f"{len(addendum['arms']) * len(addendum['training_seeds'])}; the report is written when all are in "
              "(--partial-report: now)")
        return 0
    out = args.out or os.path.join(HERE, f"{addendum['name'].replace('-', '_')}_claim")
    write_study(out, addendum["name"].replace("-", "_"), report, markdown(report, addendum))
    return 0


if __name__ == "__main__":
    sys.exit(main())
