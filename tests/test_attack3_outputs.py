"""Attack 3 on the run folder and what is written into it: nothing lost, nothing silently wrong.

--overwrite never empties a folder modsep did not make, and in one it made removes every stale output of other
parameters (a dtype that "auto" resolved differently included); task names that differ only in punctuation
get files of their own; artifacts get the umask's permissions (test_reliability.py); text is UTF-8 whatever the
locale; and the report fetches nothing, whatever a task is called.
"""
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import torch

from modsep_nb import params as P
from modsep_nb.files import file_name
from modsep_nb.index_page import write_index
from modsep_nb.report import Report
from modsep_nb.statistics import NeuronStats
from modsep_nb.study import Study
from test_reliability import fake_suite, write_params  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent


def listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. --overwrite into a folder modsep did not make --------------------------------------------------------
def test_overwrite_refuses_a_folder_modsep_did_not_make(tmp_path, fake_suite, capsys):
    from modsep_nb.__main__ import main
    theirs = tmp_path / "theirs"
    for name, data in (("params.json", b'{"survey": 1}'), ("figures/fig1.png", b"\x89PNG fake"),
                       ("statistics/survey.csv", b"a,b\n1,2\n"), ("summary.md", b"# my survey\n")):
        (theirs / name).parent.mkdir(parents=True, exist_ok=True)
        (theirs / name).write_bytes(data)
    before = listing(theirs)
    params = write_params(tmp_path, f"cache_dir: {tmp_path / 'c'}")
    assert main(["run", str(params), "--only", "01", "--out", str(theirs), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not made by modsep" in err and "--out" in err and "Traceback" not in err, err
    assert listing(theirs) == before and sorted(p.name for p in theirs.iterdir()) == [
        "figures", "params.json", "statistics", "summary.md"]            # not even a lock file was added


# -- 3. stale output of other parameters ---------------------------------------------------------------------
def test_overwrite_with_other_params_removes_every_stale_output(tmp_path, fake_suite):
    out, log = tmp_path / "run", []
    cache = f"cache_dir: {tmp_path / 'c'}"
    seed0 = write_params(tmp_path, f"run_name: r\nseed: 0\n{cache}", "s0.yaml")
    seed1 = write_params(tmp_path, f"run_name: r\nseed: 1\n{cache}", "s1.yaml")
    fake_suite.run(seed0, only="01,02", out=str(out), log=log.append)
    # what the real notebooks also write: tasks.json and the neuron pages (index.html links them)
    (out / "tasks.json").write_text(json.dumps({"lm": {"old task": {"file_name": file_name("old task")}}}))
    (out / "neurons").mkdir()
    (out / "neurons" / "lm-old.html").write_text("<p>old</p>")
    write_index(out)
    assert 'href="neurons/lm-old.html"' in (out / "index.html").read_text()
    (out / "my notes.txt").write_text("mine")                # added by the user: not modsep's to remove
    made_by_run = {p.name for p in out.iterdir()} - {"my notes.txt"}
    assert {"html", "index.html", "neurons", "tasks.json", "02_mistral_pruning.ipynb"} <= made_by_run

    fake_suite.run(seed1, only="01", out=str(out), overwrite=True, log=log.append)
    assert any("other parameters" in line for line in log), log
    assert not (out / "neurons").exists() and not (out / "tasks.json").exists()
    assert sorted(p.name for p in (out / "html").iterdir()) == ["01_vit_pruning.html"]
    page = (out / "index.html").read_text()
    assert "neurons/" not in page and "02_mistral_pruning" not in page and "seed 0" not in page
    assert "ran with seed 1" in page
    assert (out / "my notes.txt").read_text() == "mine"
    assert {p.name for p in out.iterdir()} == {".modsep-run", ".modsep.lock", "my notes.txt", "params.json",
                                               "summary.md", "index.html", "html", "findings",
                                               "01_vit_pruning.ipynb"}


# -- 21. "auto" resolved: part of the parameters -------------------------------------------------------------
def test_a_dtype_resolved_otherwise_is_other_parameters(tmp_path, fake_suite, monkeypatch):
    """`--overwrite --only` on a machine without native bfloat16 must not file its float32 results beside a
    bfloat16 machine's under the same parameters."""
    out, log = tmp_path / "run", []
    params = write_params(tmp_path, f"device: cpu\ndtype: auto\ncache_dir: {tmp_path / 'c'}")
    monkeypatch.setattr(P, "native_bfloat16", lambda device: True)          # a CPU with AMX
    fake_suite.run(params, only="02", out=str(out), log=log.append)
    resolved = json.loads((out / "params.json").read_text())["resolved"]
    assert resolved == {"device": "cpu", "lm": {"dtype": "bfloat16"}, "vit": {"dtype": "bfloat16"}}
    assert (out / "02_mistral_pruning.ipynb").is_file()

    monkeypatch.setattr(P, "native_bfloat16", lambda device: False)         # another machine
    fake_suite.run(params, only="01", out=str(out), overwrite=True, log=log.append)
    assert json.loads((out / "params.json").read_text())["resolved"]["lm"] == {"dtype": "float32"}
    assert not (out / "02_mistral_pruning.ipynb").exists(), "a bfloat16 result kept beside float32 ones"
    assert any("other parameters" in line for line in log), log


# -- 2. one file per task, whatever its name -----------------------------------------------------------------
def test_file_names_of_tasks_are_unique_and_plain():
    names = ["x y", "x_y", "x-y", "x/y", "x:y", "x.y", "X_Y", "../up", "ünï", "a" * 300, "a" * 301, "code"]
    made = [file_name(n) for n in names]
    assert len(set(made)) == len(names), dict(zip(names, made))
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", m) and m not in (".", "..") for m in made), made
    assert file_name("code") == "code" and file_name("x_y") == "x_y" and file_name("Trouser") == "Trouser"
    assert file_name("x y") == file_name("x y")                              # the same name every time


def _fake_study(kind, stats, seed=None):
    handle = SimpleNamespace(random_init=seed is not None, seed=seed)
    # retain rest: no general corpus to save (this test is about the tasks' file names)
    params = {"overlap": {"retain": "rest"}, "pruning": {"retain": "rest"}}
    return SimpleNamespace(kind=kind, handle=handle, params=params, stats=lambda progress=True: stats,
                           record=lambda: {t: {"source": "s", "statistics": [t], "evaluation": []} for t in stats})


def test_save_stats_and_tasks_json_keep_every_task(tmp_path):
    """Three tasks whose names differ only in punctuation: three statistics files, each holding its own task's
    numbers, and tasks.json names each task's file."""
    tasks = ["x y", "x_y", "x/y"]
    stats = {t: NeuronStats(torch.full((1,), 10.0), *[torch.full((1, 2), float(i), dtype=torch.float64)
                                                      for _ in range(5)]) for i, t in enumerate(tasks)}
    folder = Study.save_stats(_fake_study("lm", stats), tmp_path)
    Study.save_stats(_fake_study("lm", {"x y": stats["x_y"]}, seed=1), tmp_path)    # a random-init model's
    assert len(list(folder.glob("*.safetensors"))) == 4
    Report.save_tasks(SimpleNamespace(out_dir=tmp_path), _fake_study("lm", stats))
    record = json.loads((tmp_path / "tasks.json").read_text())["lm"]
    assert list(record) == tasks
    for i, task in enumerate(tasks):
        saved = NeuronStats.load(folder / f"lm-{record[task]['file_name']}.safetensors")
        assert saved.mean[0, 0].item() == i, task
        assert record[task]["statistics"] == [task]
    random_init = NeuronStats.load(folder / f"lm-{record['x y']['file_name']}.random-seed1.safetensors")
    assert random_init.mean[0, 0].item() == 1


def test_neuron_pages_of_tasks_named_alike_show_their_own_images(vit_dir, tmp_path):
    from modsep_nb import neurons as N
    from modsep_nb.models import load_model
    from test_neurons import NEURONS, _edges
    handle = load_model(vit_dir)
    tasks = ["x y", "x_y", "x/y"]
    images = {t: torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(tasks)}
    edges, _ = _edges(handle, images, NEURONS)
    ex = N.collect_examples(handle, images, NEURONS, picked={t: NEURONS[:1] for t in tasks}, edges=edges, k=2,
                            progress=False)
    pages = N.export(ex, tmp_path, "vit")
    assert len({p.name for p in pages}) == 3
    shown = {}
    for task, page in zip(tasks, pages):
        text = page.read_text()
        assert f"Neurons of {task}" in text
        shown[task] = {src for src in re.findall(r'<img src="([^"]+)"', text) if "-top.png" in src}
        assert len(shown[task]) == 1 and (page.parent / shown[task].copy().pop()).is_file()
    assert len(set().union(*shown.values())) == 3, shown                   # no page shows another's images


# -- 20. UTF-8 whatever the locale ---------------------------------------------------------------------------
UTF8_SCRIPT = """
import locale, sys
from pathlib import Path
from modsep_nb import runner
from modsep_nb.index_page import write_index
from modsep_nb.report import record_findings
assert locale.getpreferredencoding(False).lower() in ("ansi_x3.4-1968", "ascii"), locale.getpreferredencoding(False)
out = Path(sys.argv[1])
record_findings(out, "01_vit_pruning", "Overlap \\u2265 chance", "difference \\u22120.12 (CI \\u22120.2 to \\u22120.05)")
(out / "01_vit_pruning.ipynb").write_text("{}")          # write_summary collects the findings of finished notebooks
runner.write_summary(out, {"run_name": "r", "params_file": "p.yaml", "seed": 0, "device": "cpu"}, {})
(out / "01_vit_pruning.ipynb").unlink()
write_index(out)
"""


def test_text_is_written_as_utf8_under_an_ascii_locale(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG", "LANGUAGE")
           and not k.startswith("LC_")}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    script = tmp_path / "write.py"
    script.write_text(UTF8_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("findings/01_vit_pruning.md", "summary.md", "index.html"):
        text = (tmp_path / "out" / name).read_bytes().decode("utf-8")
        assert "\u2265 chance" in text and "\u22120.12" in text, name


# -- security: the report fetches nothing, whatever a task is called ----------------------------------------
class Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [(tag, v) for k, v in attrs if k in ("src", "href", "srcset", "data", "poster") and v]


def test_a_task_name_cannot_make_the_report_fetch_a_url(tmp_path):
    evil = ["![x](http://evil.example/x.png)", "![y][ref]", "[z](https://evil.example/z)",
            "<img src=http://evil.example/w.png>", "![v](data:image/png;base64,AAAA)"]
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "01_bars.png").write_bytes(b"\x89PNG fake")
    findings = ("## Pruning\n\n| task | accuracy |\n|---|---|\n" + "".join(f"| {t} | 0.5 |\n" for t in evil) + "\n"
                + "\n\n".join(f"Task {t}: dropped." for t in evil)
                + "\n\n![01_bars](figures/01_bars.png)\n\n[ref]: //evil.example/y.png\n")
    (tmp_path / "summary.md").write_text(findings)
    page = write_index(tmp_path).read_text()
    parser = Sources()
    parser.feed(page)
    assert ("img", "figures/01_bars.png") in parser.urls                     # local images are still shown
    assert all(":" not in url and not url.startswith("/") for _, url in parser.urls), parser.urls
    for url in ("evil.example/x.png", "evil.example/y.png", "evil.example/z", "data:image"):
        assert url not in page, url                       # (the escaped <img ...> shows as text, fetching nothing)
    assert "x (remote image, not shown)" in page and "y (remote image, not shown)" in page
