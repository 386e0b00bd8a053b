"""Model cards: every registered model is in its card, no card names a model that does not exist,
and the committed cards, zoo table and chart equal what ``python -m metazoo.cards`` renders now."""
import json
import re

import pytest
import timm
from PIL import Image

from metazoo import cards
from metazoo.backbones import list_families

REG = json.loads(cards.REGISTRY.read_text())
GENERATED = [cards.CARDS / f"{fam}.md" for fam in cards.FAMILIES] + [cards.CARDS / "README.md"]


def test_registry_snapshot_lists_every_registered_model_and_tag():
    families = list_families()
    assert {p.stem for p in cards.FACTS.glob("*.json")} == set(families), "every family needs model_cards/facts/<family>.json"
    assert {n: m["family"] for n, m in REG["models"].items()} == {n: f for f, ns in families.items() for n in ns}
    assert {n: m["tags"] for n, m in REG["models"].items()} == {n: cards.tags_of(n) for n in REG["models"]}


@pytest.mark.parametrize("name", ["mz_poolformerv2_s12", "mz_affnet_et", "mz_transnext_micro"])
def test_cached_counts_equal_a_fresh_count(name):
    assert cards.measure([name])["models"][name] == REG["models"][name], "stale counts: run python -m metazoo.cards"


def test_every_model_is_in_its_card_and_cards_name_only_real_models():
    registered = set(timm.list_models("mz_*"))
    for fam, names in list_families().items():
        text = (cards.CARDS / f"{fam}.md").read_text()
        missing = [n for n in names if not re.search(rf"\b{n}\b", text)]
        assert not missing, f"{fam}.md does not mention {missing}"
    for path in GENERATED:
        unknown = set(re.findall(r"\bmz_[a-z0-9_]+", path.read_text())) - registered
        assert not unknown, f"{path.name} names models that do not exist: {sorted(unknown)}"


def test_paper_facts_name_only_real_models_and_tags():
    for fam in cards.FAMILIES:
        facts = cards.load_facts(fam)
        for t in facts["top1"]:
            assert t["tag"] in {x["tag"] for x in REG["models"][t["model"]]["tags"]}, (fam, t)
            assert t["source"] in facts["sources"], (fam, t)
        for d in facts["dense"]:
            assert set(d["rows"]) <= set(REG["models"]) and d["source"] in facts["sources"], (fam, d["task"])


def test_committed_cards_and_chart_equal_a_fresh_render():
    bench = cards.load_bench()
    for path, text in cards.render_all(REG, bench).items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m metazoo.cards"
    with Image.open(cards.CHART) as im:
        assert im.size[0] >= 800 and im.size[1] >= 600
        assert im.text["Description"].endswith(cards.chart_digest(cards.chart_points(REG, bench))), \
            "speed_accuracy.png is stale: run python -m metazoo.cards"


def test_bench_rows_roles_and_best():
    d = {"rows": [dict(model="caformer_s18", impl=i, infer_img_s=v, train_img_s=1.0, train_peak_gib=1.0)
                  for i, v in [("ours_eager", 10.0), ("ours_compile", 30.0), ("timm_eager", 20.0), ("timm_compile", 25.0)]]}
    rows = cards.ADAPTERS["models.json"](d)
    assert {r["model"] for r in rows} == {"mz_caformer_s18"}
    assert cards.best(rows, "mz_caformer_s18", "ours")["label"] == "ours_compile"
    assert cards.best(rows, "mz_caformer_s18", "anchor")["infer_img_s"] == 25.0
    two = {"rows": [dict(model="poolformer_s12", impl=i, infer_img_s=v, run=k)  # a file combining two runs
                    for i, v, k in [("timm_compile_ro", 100.0, 0), ("timm_compile_ro", 50.0, 1), ("ours_compile_ro", 60.0, 1)]]}
    rows = cards.ADAPTERS["models.json"](two)
    assert [r["label"] for r in rows] == ["timm_compile_ro, run 1", "timm_compile_ro, run 2", "ours_compile_ro, run 2"]
    assert cards.best(rows, "mz_poolformer_s12", "anchor", rows[2]["run"])["infer_img_s"] == 50.0  # not run 1's 100
    t = {"runs": {"tiny/ours_eager/infer": {"img_s": 5.0}, "tiny/ours_eager/train": {"img_s": 2.0, "peak_mem_gib": 3.0},
                  "tiny/official_native/infer": {"skipped": "time budget"}}}
    rows = {r["label"]: r for r in cards.ADAPTERS["transnext.json"](t)}
    assert rows["ours_eager"]["train_peak_gib"] == 3.0 and rows["official_native"]["infer_img_s"] is None


def test_readme_names_exactly_the_missing_bench_files():
    bench = cards.load_bench()
    text = cards.render_readme(REG, bench, cards.chart_points(REG, bench))
    assert "Not in the repository yet" not in text  # every bench file is committed
    partial = {k: v for k, v in bench.items() if k != "vim2.json"}
    line = cards.render_readme(REG, partial, cards.chart_points(REG, partial)).splitlines()[-1]
    assert line == "Not in the repository yet: `bench/results/vim2.json`."
