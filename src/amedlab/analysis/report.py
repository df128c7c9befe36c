"""The trajectory analysis as markdown tables (what ``stage=analyze_trajectories`` prints): PCA per k,
deviations from the chord and the top-2 plane, the oracle per interval, final-sample RMSE per NFE.
The results are those of :func:`amedlab.analysis.trajectories.analyze`.
"""
from __future__ import annotations

def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def format_report(results: dict) -> str:
    """Markdown tables: PCA per k, deviations, restart per interval, chained/final per NFE."""
    pca = results["pca"]
    lines = ["PCA of each fine trajectory (median [p05, p95] over trajectories)", "",
             "| k | explained variance | 1 - explained | rel. error of rebuilt trajectory | max point rel. error |",
             "|---|---|---|---|---|"]
    for k, d in pca["components"].items():
        cells = [f"{_fmt(d[m]['median'])} [{_fmt(d[m]['p05'])}, {_fmt(d[m]['p95'])}]"
                 for m in ("explained_variance", "unexplained_variance", "rel_error", "max_point_rel_error")]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| deviation (max over the trajectory, / chord length) | median | p95 | max |", "|---|---|---|---|"]
    for key, label in (("max_line_deviation", "from the straight line x_T -> x_0"),
                       ("max_plane_deviation", "from the top-2 PCA plane"), ("arc_to_chord", "arc length / chord")):
        d = pca[key]
        lines.append(f"| {label} | {_fmt(d['median'])} | {_fmt(d['p95'])} | {_fmt(d['max'])} |")
    lines += ["", "Restart convention (each interval from the fine state, AFS on the first): RMSE per interval"]
    for nfe, o in results["oracle"]["nfe"].items():
        names = list(o["restart"][0]["rmse"])
        amed = "amed_r" in o["restart"][0]
        lines += ["", f"NFE {nfe} ({o['num_points']} points)", "",
                  "| interval | " + " | ".join(names) + " | r* median [p05, p95] | shared r | c* median |"
                  + (" AMED r median |" if amed else ""), "|---" * (len(names) + 4 + amed) + "|"]
        for e in o["restart"]:
            r = e["r_star"]
            lines.append(f"| {e['t_cur']:.4g} -> {e['t_next']:.4g} | " + " | ".join(_fmt(e["rmse"][n]) for n in names)
                         + f" | {r['median']:.3f} [{r['p05']:.3f}, {r['p95']:.3f}] | {e['r_shared']:.3f} | {e['c_star']['median']:.4f} |"
                         + (f" {e['amed_r']['median']:.3f} |" if amed else ""))
    finals = results["final_rmse"]
    nfes = list(results["oracle"]["nfe"])
    lines += ["", "Final sample RMSE against the fine trajectory's end (oracle chained from its own output)", "",
              "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name, res in finals.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(res[n]["rmse"]) if res.get(n) else "n/a" for n in nfes) + " |")
    return "\n".join(lines)
