"""The authors' released 7B scores: loading, checksums, downloads (with a fake network) and the
overlaps of the paper's figure, recomputed from the scores."""
import math
import shutil
from pathlib import Path

import pytest
import torch

from modsep_nb import paper_scores as ps
from modsep_nb.overlaps import overlap
from modsep_nb.paper_scores import SHA256
from modsep_nb.pruning import select_neurons

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "paper_scores"


def _local_root():
    root = ps.default_scores_dir()
    if root is None or not root.is_dir():
        pytest.skip("the released scores folder ($MODSEP_PAPER_SCORES, or shared/paper_scores beside the repository) "
                    "is absent")
    return root


@pytest.fixture(scope="module")
def llama():
    root = _local_root()
    if not (root / "hf").is_dir():
        pytest.skip(f"{root}/hf (Llama-7B scores) is absent")
    return ps.load_paper_scores("llama-7b", root=root)


def test_embedded_hashes_match_sha256sums():
    if not (SHARED / "SHA256SUMS").is_file():
        pytest.skip(f"{SHARED}/SHA256SUMS is absent")
    listed = dict(reversed(line.split()) for line in (SHARED / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert listed == SHA256


@pytest.mark.parametrize("name,n_tasks", [("mistral-7b", 23), ("mistral-7b-random", 20),
                                          ("llama-7b", 23), ("llama-7b-random", 19)])
def test_all_sets_load_with_expected_shapes(name, n_tasks):
    root = _local_root()
    spec = ps.PAPER_SCORE_SETS[name]
    if not (root / spec.folder).is_dir():
        pytest.skip(f"{root}/{spec.folder} is absent")
    assert len(ps.available_tasks(name)) == n_tasks
    scores = ps.load_paper_scores(name, root=root)
    assert len(scores) == n_tasks
    for task, s in scores.items():
        assert s.shape == spec.shape and s.dtype == torch.float32
    # float32 values are exactly the stored float16 values (ties preserved)
    raw = torch.load(root / ps._file_name(spec, "code"), map_location="cpu", weights_only=True)["ff_scores"]
    assert raw.dtype == torch.float16
    assert torch.equal(scores["code"], raw.float())


def test_every_task_has_one_family_and_order():
    families = ps.task_families()
    flat = [t for tasks in families.values() for t in tasks]
    assert len(flat) == len(set(flat))
    every = {t for name in ps.PAPER_SCORE_SETS for t in ps.available_tasks(name)}
    assert set(flat) == every and len(every) == 23
    order = ps.ordered_tasks(["poems", "zzz_extra", "code", "biology", "pile_PubMed_Central"])
    assert order == ["biology", "pile_PubMed_Central", "code", "poems", "zzz_extra"]


def test_llama_overlaps_match_the_paper_figure(llama):
    """Fig.: Llama-7B, 1% global top-k, overlap coefficient."""
    masks = {t: select_neurons(llama[t], 0.01, "global") for t in
             ("code", "pile_Github", "pile_PubMed_Abstracts", "pile_PubMed_Central")}
    assert overlap(masks["code"], masks["pile_Github"]) == pytest.approx(0.83, abs=0.01)
    assert overlap(masks["pile_PubMed_Abstracts"], masks["pile_PubMed_Central"]) == pytest.approx(0.63, abs=0.01)


def test_pair_overlap_reads_the_replay_matrix():
    masks = {"a": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), "b": torch.tensor([[1, 0, 1, 0]], dtype=torch.bool),
             "c": torch.tensor([[0, 0, 1, 1]], dtype=torch.bool)}
    from modsep_nb.overlaps import overlap_matrix
    names, matrix = overlap_matrix(masks)
    replay = {"tasks": names, "matrix": matrix}
    assert ps.pair_overlap(replay, "a", "b") == pytest.approx(overlap(masks["a"], masks["b"])) == 0.5
    assert ps.pair_overlap(replay, "c", "a") == 0.0
    assert math.isnan(ps.pair_overlap(replay, "a", "pile_Github"))      # a task the score set lacks


def test_tie_report_counts_ties(llama):
    sub = {t: llama[t] for t in ("code", "pile_Github")}
    report = ps.tie_report(sub, 0.01, "global")
    for task, s in sub.items():
        mask = select_neurons(s, 0.01)
        threshold = s[mask].min()
        assert report[task] == int(((s == threshold) & ~mask).sum())
    per_layer = ps.tie_report(sub, 0.01, "per_layer")
    assert set(per_layer) == set(sub) and all(v >= 0 for v in per_layer.values())


def _copy_layout(src_root, dst_root, rel, corrupt=False):
    dst = dst_root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray((src_root / rel).read_bytes())
    if corrupt:
        data[len(data) // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def test_corrupted_copy_is_refused(tmp_path):
    root = _local_root()
    rel = "hf/code-pile-hf-recent.pt"
    _copy_layout(root, tmp_path, rel, corrupt=True)
    shutil.copy(root / "SHA256SUMS", tmp_path / "SHA256SUMS")
    with pytest.raises(ps.ChecksumError, match="code-pile-hf-recent.pt") as err:
        ps.load_paper_scores("llama-7b", root=tmp_path, tasks=["code"])
    assert ps.COMMIT in str(err.value) and isinstance(err.value, ValueError)
    # the intact copy of the same file loads
    _copy_layout(root, tmp_path, rel)
    assert ps.load_paper_scores("llama-7b", root=tmp_path, tasks=["code"])["code"].shape == (32, 11008)


def test_missing_folder_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(ps.PaperScoresUnavailable) as err:
        ps.load_paper_scores("mistral-7b", root=tmp_path)
    msg = str(err.value)
    for needed in ("nickypro/taker", "examples/neuron-mapping/saved_tensors/v0.2", ps.COMMIT, "MODSEP_PAPER_SCORES"):
        assert needed in msg
    assert isinstance(err.value, FileNotFoundError)
    # nothing by default, nothing cached, no downloads allowed
    monkeypatch.setenv("MODSEP_PAPER_SCORES", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MODSEP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ps.PaperScoresUnavailable, match="download=False"):
        ps.load_paper_scores("mistral-7b", download=False)


def test_unknown_names_and_tasks():
    with pytest.raises(ValueError, match="llama-7b-random"):
        ps.load_paper_scores("gpt-2")
    with pytest.raises(ValueError, match="has no tasks"):
        ps.load_paper_scores("llama-7b-random", tasks=["biology"])


def _fake_fetch(src_root, corrupt=False):
    def fetch(url, dest):
        assert url.startswith(f"https://raw.githubusercontent.com/nickypro/taker/{ps.COMMIT}/"
                              "examples/neuron-mapping/saved_tensors/")
        rel = url.split("/saved_tensors/", 1)[1]
        data = bytearray((src_root / rel).read_bytes())
        if corrupt:
            data[100] ^= 0x01
        Path(dest).write_bytes(bytes(data))
    return fetch


def test_download_into_cache_with_fake_network(tmp_path, monkeypatch):
    root = _local_root()
    monkeypatch.setenv("MODSEP_PAPER_SCORES", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MODSEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ps, "_fetch_url", _fake_fetch(root))
    got = ps.load_paper_scores("llama-7b-random", tasks=["code", "civil"])
    cached = tmp_path / "cache" / "paper_scores" / "rand-vit"
    assert sorted(p.name for p in cached.iterdir()) == ["civil-pile-rand-recent.pt", "code-pile-rand-recent.pt"]
    local = ps.load_paper_scores("llama-7b-random", root=root, tasks=["code", "civil"])
    for t in local:
        assert torch.equal(got[t], local[t])


def test_corrupt_download_is_refused_and_not_kept(tmp_path, monkeypatch):
    root = _local_root()
    monkeypatch.setenv("MODSEP_PAPER_SCORES", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MODSEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ps, "_fetch_url", _fake_fetch(root, corrupt=True))
    with pytest.raises(ps.ChecksumError, match="code-pile-rand-recent.pt"):
        ps.load_paper_scores("mistral-7b-random", tasks=["code"])
    folder = tmp_path / "cache" / "paper_scores" / "rand-mistral"
    assert not folder.exists() or not any(folder.iterdir())    # no file, no leftover .part


def test_no_network_gives_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("MODSEP_PAPER_SCORES", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MODSEP_CACHE", str(tmp_path / "cache"))

    def offline(url, dest):
        raise OSError("network unreachable")
    monkeypatch.setattr(ps, "_fetch_url", offline)
    with pytest.raises(ps.PaperScoresUnavailable, match=ps.COMMIT):
        ps.load_paper_scores("llama-7b", tasks=["code"])


def test_notebook_02_replays_say_what_is_skipped_without_the_scores(tmp_path, monkeypatch, capsys):
    """#25 item 5: without the released scores notebook 02's replay step prints one line per model saying what is
    skipped and where the files go, records no claim, draws no figure and adds nothing to the findings."""
    from types import SimpleNamespace
    from modsep_nb.selective import PaperReplays
    monkeypatch.setenv("MODSEP_PAPER_SCORES", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MODSEP_CACHE", str(tmp_path / "cache"))

    def offline(url, dest):
        raise OSError("network unreachable")
    monkeypatch.setattr(ps, "_fetch_url", offline)
    shown, claimed = [], []
    report = SimpleNamespace(params={"paper_scores": {"frac": 0.01, "dir": None}, "overlap": {"sweep": [0.01, 0.1]},
                                     "evidence": {"n_perm": 10}, "seed": 0},
                             show=lambda *a: shown.append(a), claim=claimed.append,
                             print_claims=lambda: pytest.fail("no claims to print"))
    paper = PaperReplays(report)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == list(PaperReplays.MODELS)
    assert all("skipped" in line and "MODSEP_PAPER_SCORES" in line for line in lines)
    paper.figures()
    paper.claims()
    assert shown == [] and claimed == [] and paper.section() == "" and paper.results() == {"paper": {}}
    assert paper.text().startswith("paper scores not available")
