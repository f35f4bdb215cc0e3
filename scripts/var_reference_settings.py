"""VAR on organism-vlm under the paper's and the released reference code's settings: heads kept, rows edited and the
largest change of the last-position logits on held-out POPE scenes, for ``head_selection`` fitted / per_forward and
``include_last_layer`` off / on (issue #16: how far attnlab's defaults are from the reference's behaviour).

    python scripts/var_reference_settings.py --n-fit 40 --n-test 30 --tau 2.5
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism-vlm")
    ap.add_argument("--n-fit", type=int, default=40)
    ap.add_argument("--n-test", type=int, default=30)
    ap.add_argument("--tau", type=float, default=2.5)
    a = ap.parse_args()
    torch.set_num_threads(1)

    import attnlab
    from attnlab.datasets.shapes import pope_questions, render_scene
    from attnlab.interventions.var import VAR
    from attnlab.interventions.vhr import VisualPrompt

    def items(split: str, n: int, seed: int):
        qs = pope_questions(split, n, seed)
        return [VisualPrompt(f"USER: <image>\n{q.text} ASSISTANT:", render_scene(s)) for s, q in qs][:n]

    m = attnlab.load(a.model)
    fit, test = items("random", a.n_fit, 20001), items("adversarial", a.n_test, 10000)
    print(f"{a.model}: fit {len(fit)} POPE-random questions, measured on {len(test)} POPE-adversarial, tau {a.tau}")
    print(f"{'setting':<40} {'heads':>5} {'rows edited':>11} {'max |dlogit|':>12}")
    for selection in ("fitted", "per_forward"):
        for last in (False, True):
            var = VAR(p=0.4, tau=a.tau, rho=0.5, head_selection=selection, include_last_layer=last).fit(m, fit)
            rows, diff = 0, 0.0
            for it in test:
                b = m.encode([it.text], images=[it.image])
                with torch.no_grad():
                    base = m.forward(b)[0, -1].float()
                    with var.apply(m):
                        out = m.forward(b)[0, -1].float()
                        rows += sum(int(s.sum()) for s in var.last_selected.values())
                diff = max(diff, float((out - base).abs().max()))
            name = f"head_selection={selection}, last={last}"
            print(f"{name:<40} {len(var.heads_):>5} {rows:>11} {diff:>12.3f}")


if __name__ == "__main__":
    main()
