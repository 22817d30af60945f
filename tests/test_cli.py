"""End to end through the CLI functions on generated ``tiny`` data: train, eval, recommend, data; errors; help."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from msi import __version__
from msi.cli import TOOLS, data_main, eval_main, recommend_main, train_main
from msi.config import load_config
from msi.data.dataset import read_inter
from msi.evaluate import Evaluator, popularity_metrics
from msi.runtime import dataset_for

EPOCHS = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with ``tiny.yaml``; its data is generated on first use into ``data/tiny``."""
    d = tmp_path_factory.mktemp("cli")
    (d / "tiny.yaml").write_text(
        "data:\n  root: data\n  name: tiny\n  synth_preset: tiny\n"
        "model:\n  embedding_dim: 16\n"
        f"train:\n  epochs: {EPOCHS}\n  device: cpu\n  out_dir: runs\n  run_name: e2e\n"
        "eval:\n  ks: [10, 20]\n"
    )
    return d


@pytest.fixture(scope="module")
def run_dir(workdir) -> Path:
    assert train_main(["--config", str(workdir / "tiny.yaml"), "--quiet"]) == 0
    return workdir / "runs" / "e2e"


def run(main, argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def split_sets(workdir: Path) -> dict[str, dict[int, set[int]]]:
    """Items per user in each split, read straight from the .inter file (users without train rows dropped)."""
    users, items, labels = read_inter(workdir / "data" / "tiny" / "tiny.inter")
    out: dict[str, dict[int, set[int]]] = {"train": {}, "valid": {}, "test": {}}
    for u, i, x in zip(users.tolist(), items.tolist(), labels.tolist()):
        out[("train", "valid", "test")[x]].setdefault(u, set()).add(i)
    for split in ("valid", "test"):
        out[split] = {u: s for u, s in out[split].items() if u in out["train"]}
    return out


# ---------------------------------------------------------------- train, eval, recommend


def test_train_writes_a_run_directory(run_dir, workdir):
    assert (workdir / "data" / "tiny" / "tiny.inter").is_file()  # generated on first use
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "results.json"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    results = json.loads((run_dir / "results.json").read_text())
    assert 1 <= results["best_epoch"] <= EPOCHS and 0 <= results["test"]["recall@20"] <= 1


@pytest.mark.parametrize("split, flag", [("valid", []), ("valid", ["--split", "valid"]), ("test", ["--split", "test"])])
def test_eval_reproduces_the_runs_final_metrics(run_dir, capsys, split, flag):
    code, out, _ = run(eval_main, ["--checkpoint", run_dir / "best.pt", *flag, "--device", "cpu"], capsys)
    assert code == 0
    got = json.loads(out)
    assert got["split"] == split and got["item_view"] == "id"
    expected = json.loads((run_dir / "results.json").read_text())[split]
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)


def test_train_ends_with_one_plain_line_and_explains_the_star(run_dir, workdir, capsys, monkeypatch):
    results = json.loads((run_dir / "results.json").read_text())
    v, t = results["valid"]["recall@20"], results["test"]["recall@20"]
    floor = results["popularity"]
    data = dataset_for(load_config(workdir / "tiny.yaml"), progress=False)
    assert floor == popularity_metrics(Evaluator(data, "cpu", [10, 20]))
    monkeypatch.chdir(workdir)  # inside the working folder the run is named relative to it
    code, out, _ = run(train_main, ["--resume", run_dir, "--quiet"], capsys)
    assert out == (f"runs/e2e: best epoch {results['best_epoch']} of {EPOCHS}, recall@20 valid {v:.4f} test "
                   f"{t:.4f} (popularity: valid {floor['valid']['recall@20']:.4f} test "
                   f"{floor['test']['recall@20']:.4f}); every metric in its results.json\n")
    assert ("one line per evaluated epoch: mean train loss, valid metrics, and * when valid recall@20 is the best "
            "so far (saved as best.pt)") in (run_dir / "train.log").read_text()


def test_eval_item_view_and_ks(run_dir, capsys):
    code, out, _ = run(eval_main, ["--checkpoint", run_dir / "best.pt", "--item-view", "image", "--ks", "5,10",
                                   "--device", "cpu"], capsys)
    assert code == 0
    got = json.loads(out)
    assert got["item_view"] == "image"
    assert {"recall@5", "ndcg@10", "precision@5", "map@10", "hit@5", "mrr@10"} <= set(got) and "recall@20" not in got
    code, _, err = run(eval_main, ["--checkpoint", run_dir / "best.pt", "--item-view", "audio",
                                   "--device", "cpu"], capsys)
    assert code == 2 and "audio" in one_line_error(err)
    code, _, err = run(eval_main, ["--checkpoint", run_dir / "best.pt", "--ks", "ten", "--device", "cpu"], capsys)
    assert code == 2 and "--ks" in one_line_error(err)


def test_eval_items_warm_and_cold(run_dir, capsys):
    argv = ["--checkpoint", run_dir / "best.pt", "--device", "cpu"]
    code, out, _ = run(eval_main, argv, capsys)
    every = json.loads(out)
    code, out, _ = run(eval_main, [*argv, "--items", "warm"], capsys)
    warm = json.loads(out)  # every valid item of the tiny set has a train row: the same users, the same numbers
    assert code == 0 and (every["items"], warm["items"]) == ("all", "warm")
    assert {k: v for k, v in warm.items() if k != "items"} == {k: v for k, v in every.items() if k != "items"}
    code, _, err = run(eval_main, [*argv, "--items", "cold"], capsys)
    assert code == 2 and "no users to evaluate with cold items (--items cold)" in one_line_error(err)


def test_recommend_writes_k_rows_per_user_without_train_items(run_dir, workdir, tmp_path, capsys):
    out_tsv = tmp_path / "recs.tsv"
    code, out, _ = run(recommend_main, ["--checkpoint", run_dir / "best.pt", "--k", 7, "--out", out_tsv,
                                        "--device", "cpu"], capsys)
    assert code == 0 and "60 users" in out
    assert out_tsv.read_text().splitlines()[0] == "userID\trank\titemID\tscore"
    rows = read_tsv(out_tsv)
    train = split_sets(workdir)["train"]
    assert len(rows) == 7 * 60
    per_user: dict[int, list[int]] = {}
    for r in rows:
        u, i = int(r["userID"]), int(r["itemID"])
        assert i not in train[u], f"user {u} was recommended train item {i}"
        per_user.setdefault(u, []).append(int(r["rank"]))
    assert all(ranks == list(range(1, 8)) for ranks in per_user.values()) and len(per_user) == 60


def test_metrics_recomputed_from_the_recommend_file_equal_msi_eval(run_dir, workdir, tmp_path, capsys):
    code, out, _ = run(eval_main, ["--checkpoint", run_dir / "best.pt", "--split", "test", "--device", "cpu"],
                       capsys)
    assert code == 0
    evaluated = json.loads(out)
    out_tsv = tmp_path / "test.tsv"
    code, _, _ = run(recommend_main, ["--checkpoint", run_dir / "best.pt", "--users", "split", "--split", "test",
                                      "--k", 20, "--out", out_tsv, "--device", "cpu"], capsys)
    assert code == 0
    truth = split_sets(workdir)["test"]
    lists: dict[int, list[int]] = {}
    for r in read_tsv(out_tsv):
        lists.setdefault(int(r["userID"]), []).append(int(r["itemID"]))
    assert set(lists) == set(truth)
    recall, ndcg = [], []
    for u, items in lists.items():
        hits = [i in truth[u] for i in items[:20]]
        recall.append(sum(hits) / len(truth[u]))
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(20, len(truth[u]))))
        ndcg.append(dcg / ideal)
    assert sum(recall) / len(recall) == pytest.approx(evaluated["recall@20"], abs=1e-6)
    assert sum(ndcg) / len(ndcg) == pytest.approx(evaluated["ndcg@20"], abs=1e-6)


def test_resume_of_a_finished_run_and_resume_with_a_config(run_dir, workdir, capsys):
    """Resuming a finished run prints its results and changes nothing; --resume with --config is refused."""
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "train.log"}
    code, out, err = run(train_main, ["--resume", run_dir, "--quiet"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"{run_dir}: best epoch ")  # the run's line, as at its end
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "train.log"} == before
    code, _, err = run(train_main, ["--resume", run_dir, "--config", workdir / "tiny.yaml"], capsys)
    assert code == 2 and "--resume" in one_line_error(err)


def test_resume_extends_a_finished_run_with_more_epochs_and_refuses_other_keys(run_dir, tmp_path, capsys):
    run_copy = tmp_path / "e2e"
    shutil.copytree(run_dir, run_copy)
    code, _, err = run(train_main, ["--resume", run_copy, "model.dropout=0.1", "--quiet"], capsys)
    assert code == 2 and "--resume cannot change 'model.dropout'" in one_line_error(err)
    code, out, _ = run(train_main, ["--resume", run_copy, f"train.epochs={EPOCHS + 1}", "--quiet"], capsys)
    assert code == 0 and out.startswith(f"{run_copy}: best epoch ")
    assert json.loads((run_copy / "results.json").read_text())["epochs_run"] == EPOCHS + 1
    assert f"resume with train.epochs={EPOCHS + 1} (was {EPOCHS})" in (run_copy / "train.log").read_text()


def test_data_synth_writes_a_data_set_and_prepare_refuses_to_overwrite_it(tmp_path, capsys):
    code, out, _ = run(data_main, ["synth", "--preset", "tiny", "--out", tmp_path / "gen", "--quiet"], capsys)
    assert code == 0 and str(tmp_path / "gen") in out
    assert {p.name for p in (tmp_path / "gen").iterdir()} == {"gen.inter", "image_feat.npy", "text_feat.npy"}
    (tmp_path / "r.json").write_text("")
    code, _, err = run(data_main, ["prepare", "--reviews", tmp_path / "r.json", "--meta", tmp_path / "r.json",
                                   "--name", "gen", "--out", tmp_path], capsys)
    assert code == 2 and "--overwrite" in one_line_error(err)


# ---------------------------------------------------------------- errors: exit code 2, one line on stderr


@pytest.mark.parametrize("main", [eval_main, recommend_main])
def test_a_missing_checkpoint(main, tmp_path, capsys):
    argv = ["--checkpoint", tmp_path / "nope.pt", "--device", "cpu"]
    code, _, err = run(main, argv + (["--out", tmp_path / "r.tsv"] if main is recommend_main else []), capsys)
    assert code == 2
    assert str(tmp_path / "nope.pt") in one_line_error(err)
    code, _, err = run(train_main, ["--resume", tmp_path / "norun"], capsys)
    assert code == 2 and "last.pt" in one_line_error(err)


def test_an_unknown_config_key_in_an_override(workdir, capsys):
    code, _, err = run(train_main, ["--config", workdir / "tiny.yaml", "train.epoch=2", "--quiet"], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "train.epoch" in line and "train.epochs" in line  # names the key and suggests the right one


def test_a_missing_config_file(tmp_path, capsys):
    code, _, err = run(train_main, ["--config", tmp_path / "nope.yaml"], capsys)
    assert code == 2 and "nope.yaml" in one_line_error(err)


def test_a_bad_data_file_is_named(tmp_path, capsys):
    (tmp_path / "data" / "bad").mkdir(parents=True)
    (tmp_path / "data" / "bad" / "bad.inter").write_text("userID\titemID\n0\t1\n1\t0\n")  # no x_label
    (tmp_path / "bad.yaml").write_text("data: {root: data, name: bad}\ntrain: {epochs: 1, device: cpu}\n")
    code, _, err = run(train_main, ["--config", tmp_path / "bad.yaml", "--quiet", "--out", tmp_path / "run"], capsys)
    assert code == 2
    line = one_line_error(err)
    assert str(tmp_path / "data" / "bad" / "bad.inter") in line and "x_label" in line


def test_a_bad_users_file_for_recommend(run_dir, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("1\nbob\n")
    code, _, err = run(recommend_main, ["--checkpoint", run_dir / "best.pt", "--users", users,
                                        "--out", tmp_path / "r.tsv", "--device", "cpu"], capsys)
    assert code == 2 and f"{users}:2" in one_line_error(err)
    assert not (tmp_path / "r.tsv").exists()


# ---------------------------------------------------------------- help, keys, version


@pytest.mark.parametrize("main, options", [
    (train_main, ["--config", "--resume", "--device", "--out", "--quiet", "--list-keys", "key=value"]),
    (eval_main, ["--checkpoint", "--split", "--item-view", "--ks", "--mask-valid"]),
    (recommend_main, ["--checkpoint", "--users", "--k", "--split", "--out", "--mask-valid"]),
    (data_main, ["synth", "prepare"]),
])
def test_help_exits_0_and_mentions_the_key_options(main, options, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out, option


@pytest.mark.parametrize("argv", [["msi-train"], ["msi-eval"], ["msi-recommend"], ["msi-data", "synth"],
                                  ["msi-data", "prepare"], ["msi-sweep"], ["msi-plot"], ["msi-compare"]])
def test_help_says_each_default_once_and_never_none(argv, capsys):
    with pytest.raises(SystemExit):
        TOOLS[argv[0].removeprefix("msi-")]([*argv[1:], "--help"])
    options = " ".join(capsys.readouterr().out.split()).split(" -")  # one entry per option, lines joined
    assert not [o for o in options if o.count("(default:") > 1 or "(default: None)" in o]


def test_list_keys(capsys):
    code, out, _ = run(train_main, ["--list-keys"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert any(re.fullmatch(r"loss\.alpha: 0\.1 +# weight of L_ssd", line) for line in lines)  # YAML, described
    assert any(re.fullmatch(r"train\.autocast: 'off' +# off \| bf16: .*", line) for line in lines)
    code, out, _ = run(train_main, ["--list-keys", "model.name=lightgcn"], capsys)
    assert code == 0 and "loss.gamma: 0.0001" in out and "loss.alpha" not in out  # that model's own keys
    assert run(train_main, ["--list-keys", "train.epochs=3"], capsys)[0] == 2  # only model.name picks the keys


def test_msi_train_version_in_a_subprocess():
    exe = shutil.which("msi-train")
    if exe is None:
        pytest.skip("msi-train is not installed on PATH")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"msi-train {__version__}"
