"""The three strategies on the causal-LM zoo, driven in this process (no Ray, no Tune).

Until `evoray run` scores causal LMs on qa tasks end to end, this is how the README's LM table
was measured: evoray's own strategies (Evolver, kinship greedy, recipe search) and mergers
(average, Fisher) on the zoo's flat weight vectors, answered by the in-process population of
tests/test_strategies.py, with fitness = mean exact match of greedy answers on the four skills'
dev sets and the answer's test scores from examples/lm_zoo_baselines.py. Fisher statistics:
per-text squared gradients of the answer tokens' log-likelihood, each expert on 128 examples of
its own skill. Run from the repository root:

    python benchmarks/lm_zoo_strategies.py evolver-none 15      # or evolver-average 15,
    python benchmarks/lm_zoo_strategies.py fisher-oneshot       # evolver-fisher 15, greedy,
    python benchmarks/lm_zoo_strategies.py recipe               # [--root DIR] last
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = ["examples", "."]

import torch  # noqa: E402
from lm_zoo_baselines import score  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from evoray.models.lm_zoo import _encode, build_lm_zoo, exact_match, make_lm_tokenizer  # noqa: E402
from evoray.population.mergers import make_merger  # noqa: E402
from evoray.strategies.base import Problem, drive  # noqa: E402
from evoray.strategies.evolver import Evolver, EvolverSettings  # noqa: E402
from evoray.strategies.greedy import GreedySettings, KinshipGreedy  # noqa: E402
from evoray.strategies.recipe import RecipeSearch, RecipeSettings  # noqa: E402
from evoray.tasks import skills  # noqa: E402
from evoray.weights.checkpoint import open_checkpoint  # noqa: E402
from evoray.weights.flat import flatten  # noqa: E402
from evoray.weights.layout import Layout  # noqa: E402
from tests import test_strategies as ts  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--root")]
    root = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--root=")), None)
    which = args[0]
    zoo = build_lm_zoo(root)
    tok = make_lm_tokenizer(zoo.spec.seed)
    with open_checkpoint(str(zoo.base)) as c:
        layout = Layout.from_checkpoint(c)
        base = flatten(c, layout).as_tensor().clone()
    members = []
    for p in zoo.experts.values():
        with open_checkpoint(str(p)) as c:
            members.append(flatten(c, layout).as_tensor().clone())
    ts.LAYOUT = layout  # the in-process population merges on this layout
    model = LlamaForCausalLM.from_pretrained(zoo.base).eval()
    dev = {s: skills.skill_split(s, "dev", zoo.spec.seed) for s in skills.EXPERT_SKILLS}

    def load(v: torch.Tensor) -> None:
        sd = {s.name: v[s.offset : s.offset + s.numel].view(s.shape) for s in layout.slots}
        model.load_state_dict(sd, strict=False)

    def fit(v: torch.Tensor) -> float:
        load(v)
        return sum(exact_match(model, tok, dev[s]) for s in dev) / len(dev)

    def fishers(n: int = 128) -> list[dict[str, torch.Tensor]]:
        out = []
        for skill, p in zoo.experts.items():
            m = LlamaForCausalLM.from_pretrained(p).eval()
            data = _encode(tok, skills.skill_split(skill, "train", zoo.spec.seed)[:n], True)
            acc = {k: torch.zeros_like(v) for k, v in m.named_parameters()}
            for i in range(n):
                m.zero_grad()
                row = {k: v[i : i + 1] for k, v in data.items()}
                tokens = int((row["labels"][:, 1:] != -100).sum())
                (m(**row).loss * tokens).backward()  # summed token log-likelihood of one text
                for k, v in m.named_parameters():
                    acc[k] += v.grad.detach() ** 2 / n
            out.append(acc)
        return out

    class Pop(ts.LocalPopulation):
        def fitness(self, v: torch.Tensor) -> float:
            return fit(v)

    def report(v: torch.Tensor, evaluated: int) -> None:
        load(v)
        d = Path(tempfile.mkdtemp())
        model.save_pretrained(d)
        tok.save_pretrained(d)
        print(which, "dev evaluations", evaluated, "test", score(d, tok))

    if which == "fisher-oneshot":
        report(make_merger("fisher", layout, len(members), fishers=fishers()).merge(members), 1)
        return
    pop = Pop(list(members), base, None)
    problem = Problem(len(members), True, n_layers=2)
    if which.startswith("evolver-"):
        gens = int(args[1]) if len(args) > 1 else 15
        st = Evolver(EvolverSettings(generations=gens, seed=0, merger=which[8:]), problem)
    elif which == "greedy":
        st = KinshipGreedy(
            GreedySettings(k=3, operator="task_arithmetic", weight=0.8, max_generations=4), problem
        )
    else:
        st = RecipeSearch(
            RecipeSettings(rounds=8, batch_size=4, weight_range=(0.0, 1.5), seed=0), problem
        )
    t0 = time.perf_counter()
    merger = st.merger()
    if merger is not None:
        extra = {"fishers": fishers()} if merger[0] == "fisher" else {}
        pop.merger = make_merger(merger[0], layout, len(members), **merger[1], **extra)
    for batch in st.replay():
        pop.execute(batch)
    drive(st.setup(), pop.execute)
    while not st.done:
        drive(st.generation(), pop.execute)
        print(f"best dev {st.best_fitness:.3f} after {time.perf_counter() - t0:.0f} s")
    report(pop.build(st.answer(), pop.members, pop.merged), pop.evaluated)


if __name__ == "__main__":
    main()
