"""The anatomy benchmark v2's report, built from records alone (``records.collect``): ``report.md``,
``anatomy_v2.json`` and, where the run directory holds sample grids, ``figures/samples_v2.png``.

The primary analysis is the one ``bench/PROTOCOL.md`` fixes: per (contrast, sampler) a two-sided paired t-test over
training seeds of the per-seed pass rates, Holm-corrected over the family. Everything else is secondary and
labelled so; the pooled McNemar tests treat the trained models as fixed.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Optional

import numpy as np

from anatomy_stats import holm, mcnemar, mean_interval, minimum_detectable_effect, seed_paired_test, seeds_needed

V1_SEED_SD = 0.049  # between-seed SD of the paired pass-rate difference measured in v1 (issue 26), for planning
EFFECTS = (0.02, 0.05, 0.10)
SENSITIVITY_TARGET = 0.95  # the share of corrupted real slices a judge must flag (issue 26)


def _per_seed(records: list, key: str, judge: str = "A", size: str = "primary") -> dict[str, dict[tuple, float]]:
    """``{arm: {(setup_id, seed): pass rate}}`` at one ``budget/sampler`` key."""
    out: dict[str, dict[tuple, float]] = {}
    for record, _ in records:
        ev = record["evals"].get(key)
        if ev is not None:
            out.setdefault(record["arm"], {})[(record["setup_id"], record["training_seed"])] = \
                float(ev["judges"][judge][size]["pass_rate"])
    return out


def _paired(values: dict[str, dict[tuple, float]], a: str, b: str) -> Optional[dict[str, Any]]:
    if a not in values or b not in values:
        return None
    common = sorted(set(values[a]) & set(values[b]))
    if not common:
        return None
    test = seed_paired_test([values[a][k] for k in common], [values[b][k] for k in common])
    return {**test, "seeds": [k[1] for k in common]}


def _family(records: list, tests: list[tuple[str, str, str, str, str, str]]) -> list[dict[str, Any]]:
    """Seed-level paired tests ``(a, b, budget, sampler, judge, size)``, Holm-adjusted over the family."""
    rows = []
    for a, b, budget, sampler, judge, size in tests:
        res = _paired(_per_seed(records, f"{budget}/{sampler}", judge, size), a, b)
        if res is not None:
            rows.append({"contrast": f"{a} - {b}", "budget": budget, "sampler": sampler, "judge": judge,
                         "min_size": size, **res})
    adjusted = holm({str(i): r.get("p") for i, r in enumerate(rows)})
    for i, r in enumerate(rows):
        r["p_holm"] = adjusted[str(i)]
    return rows


def _pooled(records: list, a: str, b: str, key: str) -> Optional[dict[str, Any]]:
    """Pooled exact McNemar over every paired sample of the seeds both arms have (models treated as fixed)."""
    arrays = {(r["arm"], r["setup_id"], r["training_seed"]): arr for r, arr in records}
    xa, xb = [], []
    for (arm, setup_id, seed), arr in arrays.items():
        other = arrays.get((b, setup_id, seed))
        name = f"{key}/A/primary/plausible"
        if arm != a or other is None or arr is None or name not in arr or name not in other:
            continue
        n = min(len(arr[name]), len(other[name]))
        xa.append(arr[name][:n])
        xb.append(other[name][:n])
    if not xa:
        return None
    return mcnemar(np.concatenate(xa), np.concatenate(xb))


def _scalars(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict, keyed by their path."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_scalars(v, f"{prefix}{k}/" if isinstance(v, dict) else f"{prefix}{k}"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        out[prefix.rstrip("/")] = float(tree)
    return out


_COUNTS = ("n_real", "n_sample", "num_classes", "min_area", "k", "n_classes", "n_missing", "n")


def _shown(name: str) -> bool:
    """Measures the report shows: distances, rates and shares, not the counts behind them."""
    last = name.split("/")[-1]
    return last not in _COUNTS and not last.startswith("n_") and "spread" not in name


def summarise(collected: dict[str, Any]) -> dict[str, Any]:
    records = collected["records"]
    protocol = records[0][0]["protocol"]
    arms = list(dict.fromkeys(r["arm"] for r, _ in sorted(records, key=lambda x: protocol["arms"].index(x[0]["arm"])
                                                            if x[0]["arm"] in protocol["arms"] else 99)))
    keys = sorted({k for r, _ in records for k in r["evals"]})
    samplers = list(protocol["samplers"])
    pass_rates = {}
    for key in keys:
        per = _per_seed(records, key)
        pass_rates[key] = {arm: {**mean_interval(list(per[arm].values())), "per_seed": {str(k[1]): v for k, v in
                                                                                         sorted(per[arm].items())}}
                           for arm in arms if arm in per}
    primary_tests = [(a, b, budget, s, protocol["primary"]["judge"], "primary")
                     for a, b, budget in protocol["primary"]["contrasts"] for s in protocol["primary"]["samplers"]]
    primary = _family(records, primary_tests)
    pairs = [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:]]
    # every pair of arms at both budgets and the quarter checkpoint with judge A, and the primary contrasts seen by
    # the other judge and at the other minimum component size
    secondary_tests = [(a, b, budget, s, "A", "primary") for a, b in pairs for budget in ("steps", "flops", "quarter")
                       for s in samplers if not (budget == "quarter" and s != "ddim")]
    secondary_tests += [(a, b, budget, s, j, size) for a, b, budget, s, _, _ in primary_tests
                        for j, size in (("B", "primary"), ("A", "secondary"))]
    secondary_tests = [t for t in secondary_tests if t not in primary_tests]
    secondary = _family(records, secondary_tests)
    for row in primary:
        row["pooled_mcnemar_secondary"] = _pooled(records, *row["contrast"].split(" - "), f"{row['budget']}/"
                                                                                         f"{row['sampler']}")
    power = []  # for every primary test, run or not yet (then on the planning SD)
    found = {(r["contrast"], r["budget"], r["sampler"]): r for r in primary}
    for a, b, budget, sampler, _, _ in primary_tests:
        row = found.get((f"{a} - {b}", budget, sampler), {"n": 0})
        sd = row.get("sd_diff") if row.get("n", 0) >= 2 and row.get("sd_diff") else None
        basis = "observed" if sd else "v1 between-seed SD (planning value)"
        sd = sd or V1_SEED_SD
        alpha = float(protocol["primary"]["alpha"]) / len(primary_tests)  # Bonferroni: Holm's first step
        power.append({"contrast": f"{a} - {b}", "budget": budget, "sampler": sampler, "sd_diff": sd,
                      "basis": basis, "alpha": alpha,
                      "seeds_needed": {f"{e:g}": seeds_needed(sd, e, alpha=alpha) for e in EFFECTS},
                      "mde_at_n": minimum_detectable_effect(sd, row["n"], alpha=alpha) if row["n"] >= 2 else None,
                      "mde_at_10": minimum_detectable_effect(sd, 10, alpha=alpha)})
    measures: dict[str, dict[str, dict[str, Any]]] = {}
    for key in keys:
        for arm in arms:
            vals: dict[str, list[float]] = {}
            for r, _ in records:
                if r["arm"] == arm and key in r["evals"]:
                    for name, v in _scalars(r["evals"][key].get("measures", {})).items():
                        if _shown(name):
                            vals.setdefault(name, []).append(v)
            measures.setdefault(key, {})[arm] = {k: mean_interval(v) for k, v in vals.items()}
    cost = {}
    for arm in arms:
        rs = [r for r, _ in records if r["arm"] == arm]
        first = rs[0]
        cost[arm] = {"params": first["model"]["params"],
                     "train_flops_per_sample": first["model"]["train_flops_per_sample"],
                     "budget_steps": first["train"]["budget_steps"],
                     "train_seconds": mean_interval([r["train"]["train_seconds"] for r in rs]),
                     "sampling_seconds_per_sample": mean_interval([r["evals"]["steps/ddim"]
                                                                   ["sampling_seconds_per_sample"] for r in rs
                                                                   if "steps/ddim" in r["evals"]]),
                     "devices": sorted({r["device"] for r in rs}),
                     "latent_rms": mean_interval([r["evals"]["steps/ddim"]["latent_rms"] for r in rs
                                                  if "steps/ddim" in r["evals"]])}
        own = [r["evals"]["steps/ddim"].get("own_mask") for r in rs if "steps/ddim" in r["evals"]]
        if own and all(own):
            cost[arm]["own_mask_dice_vs_judge_A"] = mean_interval([o["dice_vs_judge_A"]["foreground_mean"]
                                                                   for o in own])
    rules: dict[str, dict[str, Any]] = {}
    for arm in arms:
        per_rule: dict[str, list[float]] = {}
        for r, _ in records:
            if r["arm"] == arm and "steps/ddim" in r["evals"]:
                for rule, v in r["evals"]["steps/ddim"]["judges"]["A"]["primary"]["rule_failure"].items():
                    per_rule.setdefault(rule, []).append(v)
        rules[arm] = {rule: float(np.mean(v)) for rule, v in per_rule.items()}
    setups = {sid: collected["setups"][sid] for sid in sorted({r["setup_id"] for r, _ in records})}
    return {"protocol_hash": collected["protocol_hash"], "protocol": protocol,
            "claim": all(r["claim"] for r, _ in records), "mixed_claim": len({r["claim"] for r, _ in records}) > 1,
            "arms": arms, "seeds": {arm: sorted(r["training_seed"] for r, _ in records if r["arm"] == arm)
                                    for arm in arms},
            "commits": sorted({f"{r['code']['commit']}{' (modified)' if r['code']['dirty'] else ''}"
                               for r, _ in records}),
            "pass_rates": pass_rates, "rule_failure": rules, "primary": primary, "secondary": secondary, "power": power,
            "measures": measures, "cost": cost, "setups": setups, "other_protocol_hashes": collected["other_hashes"]}


# ------------------------------------------------------------------------------------------------ Markdown
def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _ci_pct(d: dict[str, Any]) -> str:
    if d.get("mean") is None:
        return "-"
    if d.get("lo") is None:
        return f"{_pct(d['mean'])} (n={d['n']})"
    return f"{_pct(d['mean'])} [{_pct(d['lo'])}, {_pct(d['hi'])}] (n={d['n']})"


def _p(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


def _test_rows(rows: list[dict[str, Any]], with_pooled: bool = False) -> list[str]:
    head = "| contrast | budget | sampler | judge | min size | seeds | diff (points) | 95 % CI | p | p (Holm) |"
    lines = [head + (" pooled McNemar p (secondary) |" if with_pooled else ""),
             "|" + "---|" * (10 + int(with_pooled))]
    for r in rows:
        ci = "-" if r.get("lo") is None else f"[{_pct(r['lo'], True)}, {_pct(r['hi'], True)}]"
        line = (f"| {r['contrast']} | {r['budget']} | {r['sampler']} | {r['judge']} | {r['min_size']} | {r['n']} | "
                f"{_pct(r['diff'], True)} | {ci} | {_p(r.get('p'))} | {_p(r.get('p_holm'))} |")
        if with_pooled:
            mc = r.get("pooled_mcnemar_secondary")
            line += f" {_p(mc['p_value']) if mc else '-'} |"
        lines.append(line)
    return lines


def _sensitivity_lines(cal: dict[str, Any]) -> list[str]:
    sens = cal.get("sensitivity", {})
    if not sens:
        return []
    cols = [c for c in next(iter(sens.values())) if c != "n"]
    lines = ["| corruption | n | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for kind, row in sens.items():
        lines.append(f"| {kind} | {row['n']} | " + " | ".join(_pct(row[c]) for c in cols) + " |")
    return lines


#: the claim seeds every arm needs before a claim run's report is a claim (bench/PROTOCOL.md, "Number of claim seeds")
DECIDED_CLAIM_SEEDS = (7301, 7302, 7303, 7304, 7305)


def claim_status(summary: dict[str, Any]) -> str:
    """What the report is: a complete claim run, a partial one (and what is missing), or not a claim."""
    if summary["mixed_claim"]:
        return "**mixed claim and development records: not a claim**"
    if not summary["claim"]:
        return "**development run, not a claim** (development seeds)"
    missing = {arm: sorted(set(DECIDED_CLAIM_SEEDS) - set(summary["seeds"].get(arm, [])))
               for arm in summary["protocol"]["arms"]}
    missing = {arm: seeds for arm, seeds in missing.items() if seeds}
    if missing:
        return ("**partial claim run: not a claim until every arm has the claim seeds "
                f"{list(DECIDED_CLAIM_SEEDS)}** (missing: "
                + "; ".join(f"{arm} {seeds}" for arm, seeds in missing.items()) + ")")
    if len(summary["setups"]) > 1:
        return "**claim seeds from several instruments: pairs are formed within one, see Setups**"
    return "**claim run** (the protocol's claim seeds)"


def markdown(summary: dict[str, Any]) -> str:
    proto = summary["protocol"]
    kind = claim_status(summary)
    out = [f"# Anatomy benchmark v2 report", "",
           f"{kind}; protocol `{proto['protocol']}` v{proto['version']}, hash `{summary['protocol_hash']}`; "
           f"code {', '.join(summary['commits'])}.", ""]
    out += ["Seeds per arm: " + "; ".join(f"{a}: {s}" for a, s in summary["seeds"].items()) + ".", ""]
    if summary["other_protocol_hashes"]:
        out += [f"Records of other protocols were left out: {summary['other_protocol_hashes']}.", ""]
    out += ["## Primary analysis (pre-registered, bench/PROTOCOL.md)", "",
            f"Pass rate of judge {proto['primary']['judge']} at minimum component size "
            f"{proto['primary']['min_area_frac']}; paired t-test over training seeds, Holm over the family, "
            f"alpha {proto['primary']['alpha']}.", ""]
    out += (_test_rows(summary["primary"], with_pooled=True) if summary["primary"] else
            ["(no contrast yet: no training seed has records of both arms of a contrast)"])
    sig = [r for r in summary["primary"] if r.get("p_holm") is not None and r["p_holm"] < proto["primary"]["alpha"]]
    named = ", ".join(f"{r['contrast']} ({r['budget']}, {r['sampler']})" for r in sig)
    out += ["", f"Significant after Holm: {named or 'none'}.", ""]
    out += ["## Pass rates (mean over seeds, t interval)", "",
            "| budget/sampler | " + " | ".join(summary["arms"]) + " |", "|" + "---|" * (len(summary["arms"]) + 1)]
    for key, per in summary["pass_rates"].items():
        out.append(f"| {key} | " + " | ".join(_ci_pct(per[a]) if a in per else "-" for a in summary["arms"]) + " |")
    rule_names = sorted({n for v in summary["rule_failure"].values() for n in v})
    if rule_names:
        out += ["", "Failure rate (%) of each rule, final checkpoint, DDIM, judge A (mean over seeds):", "",
                "| rule | " + " | ".join(summary["arms"]) + " |", "|" + "---|" * (len(summary["arms"]) + 1)]
        for n in rule_names:
            out.append(f"| {n} | " + " | ".join(_pct(summary["rule_failure"].get(a, {}).get(n))
                                                 for a in summary["arms"]) + " |")
    out += ["", "## Power analysis", "", "Paired t-test at 80 % power and alpha "
            f"{summary['power'][0]['alpha'] if summary['power'] else '-':.4g} per test (the family's alpha over its "
            "size: Holm's first step, the conservative plan).", "", "| contrast | budget | sampler | SD of seed difference | basis | seeds for "
            + " / ".join(f"{100 * e:g}" for e in EFFECTS) + " points | MDE at these seeds | MDE at 10 seeds |",
            "|---|---|---|---|---|---|---|---|"]
    for p in summary["power"]:
        need = " / ".join("-" if v is None else str(v) for v in p["seeds_needed"].values())
        out.append(f"| {p['contrast']} | {p['budget']} | {p['sampler']} | {_pct(p['sd_diff'])} | {p['basis']} | "
                   f"{need} | {_pct(p['mde_at_n'])} | {_pct(p['mde_at_10'])} |")
    out += ["", "## Capacity, compute and convergence", "",
            "| arm | params | train GFLOPs/sample | params / anatomical | FLOPs / anatomical | budget steps | "
            "train s (mean) | sampling s/sample | sampled latent RMS | own-mask Dice vs judge A |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    anat = summary["cost"].get("anatomical")
    for arm, c in summary["cost"].items():
        pr = c["params"] / anat["params"] if anat else None
        fr = c["train_flops_per_sample"] / anat["train_flops_per_sample"] if anat else None
        dice = c.get("own_mask_dice_vs_judge_A")
        out.append(f"| {arm} | {c['params']:,} | {c['train_flops_per_sample'] / 1e9:.3f} | "
                   f"{'-' if pr is None else f'{pr:.3f}'} | {'-' if fr is None else f'{fr:.3f}'} | "
                   f"{_steps(c['budget_steps'])} | {_num(c['train_seconds']['mean'], 0)} | "
                   f"{_num(c['sampling_seconds_per_sample']['mean'], 3)} | {_num(c['latent_rms']['mean'], 3)} | "
                   f"{'-' if not dice else _num(dice['mean'], 3)} |")
    for sid, setup in summary["setups"].items():
        cal = setup["calibration"]
        out += ["", f"## Instrument (setup `{sid}`, {setup['device']})", "",
                f"Real latent RMS {cal['real_latent_rms']:.3f} (convergence: the plain arm's sampled latent RMS "
                "should match it). Test split variants: " + ", ".join(f"{k} {v}" for k, v in
                                                                       cal["test_variants"].items()) + ".", "",
                "| what | pass rate (min size primary) | pass rate (secondary) |", "|---|---|---|"]
        for what in ["true_masks"] + [f"judge_{j}/{w}" for j in ("A", "B") for w in ("real", "reconstructed")]:
            out.append(f"| {what} | {_pct(cal[f'{what}/primary']['pass_rate'])} | "
                       f"{_pct(cal[f'{what}/secondary']['pass_rate'])} |")
        agree = cal["judge_agreement_real"]
        out += ["", f"Judges on real test slices: agreement {_pct(agree['agree'])} %, kappa "
                    f"{_num(agree['kappa'], 3)}; foreground Dice against the true masks: " +
                ", ".join(f"{j} {_num(d['foreground_mean'], 3)}" for j, d in cal["judge_dice"].items()) + ".", "",
                "**Judge sensitivity**: the share (%) of corrupted real slices flagged, by the checker on the true "
                "corrupted mask and by each judge on the corrupted image, at both minimum component sizes.", ""]
        out += _sensitivity_lines(cal)
        low = [f"{kind} ({_pct(row['judge_A/primary'])} %)" for kind, row in cal.get("sensitivity", {}).items()
               if row.get("judge_A/primary", 1.0) < SENSITIVITY_TARGET]
        out += ["", f"Kinds judge A detects in fewer than {100 * SENSITIVITY_TARGET:.0f} % of corrupted slices (the "
                    f"target): {', '.join(low) if low else 'none'}."]
    out += ["", "## Secondary analyses (not part of the pre-registered family)", "",
            "Seed-level paired tests of every other contrast, budget, sampler, judge and minimum size, Holm over "
            "this family.", ""]
    out += _test_rows(summary["secondary"])
    out += ["", "### Unsaturated measures (judge A masks against judge A's masks of the real test split; mean "
                "over seeds)", ""]
    for key, per in summary["measures"].items():
        names = sorted({n for a in per.values() for n in a})
        if not names:
            continue
        out += [f"**{key}**", "", "| measure | " + " | ".join(per) + " |", "|" + "---|" * (len(per) + 1)]
        for n in names:
            out.append(f"| {n} | " + " | ".join(_num(per[a][n]["mean"], 4) if n in per[a] else "-" for a in per)
                       + " |")
        out.append("")
    return "\n".join(out) + "\n"


def _steps(budget: dict[str, int]) -> str:
    return f"{budget['steps']} (equal FLOPs: {budget['flops']}; quarter: {budget['quarter']})"


def _num(x: Optional[float], digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def figure(out: str, arms: list[str]) -> Optional[str]:
    """Samples of each arm (first seed, final checkpoint, DDIM eta 0) with judge A's masks drawn over them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldm.data.labels import get_label_set
    from ldm.evaluation.report import overlay_masks

    rows = []
    real = os.path.join(out, "setup", "real_grid.npz")
    if os.path.isfile(real):
        with np.load(real) as z:
            rows.append(("real test slices", z["images"][:8, 0], z["masks"][:8], "true masks"))
    for arm in arms:
        grids = sorted(glob.glob(os.path.join(out, "arms", arm, "seed*", "grid_step*_0.npz")))
        if grids:
            final = max(grids, key=lambda p: int(os.path.basename(p).split("step")[1].split("_")[0]))
            with np.load(final) as z:
                rows.append((arm, z["images"][:8, 0], z["masks"][:8], "judge A masks"))
    if not rows:
        return None
    palette = get_label_set("phantom2").palette()
    n = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(2 * len(rows), n, figsize=(1.3 * n, 2.7 * len(rows)), squeeze=False)
    if len(rows) == 1:
        return None  # no arm has samples here (a report from copied records)
    for i, (arm, images, masks, source) in enumerate(rows):
        over = overlay_masks(images, masks, palette)
        for k in range(n):
            for r, img in ((2 * i, (images[k] + 1) / 2 if k < len(images) else None),
                           (2 * i + 1, over[k] if k < len(images) else None)):
                ax = axes[r][k]
                ax.axis("off")
                if img is not None:
                    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[2 * i][0].set_title(arm if i == 0 else f"{arm}: samples", fontsize=8, loc="left")
        axes[2 * i + 1][0].set_title(source, fontsize=8, loc="left")
    fig.tight_layout()
    path = os.path.join(out, "figures", "samples_v2.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: str, collected: dict[str, Any]) -> str:
    """``out/report.md`` and ``out/anatomy_v2.json`` from collected records (and the figure where ``out`` holds
    sample grids); returns the report's path."""
    os.makedirs(out, exist_ok=True)
    summary = summarise(collected)
    fig = figure(out, summary["arms"])
    text = markdown(summary)
    if fig:
        text += f"\n![samples with judge A masks]({os.path.relpath(fig, out)})\n"
    with open(os.path.join(out, "anatomy_v2.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(text)
    return path
