"""`trinity report RUN RUN -o page.html`: runs side by side, checked in a real browser."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from trinity_dpo import cli
from trinity_dpo.config.loader import load_config
from trinity_dpo.run import train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, qwen_dir):
    """Two short runs that differ in their learning rate, with held-out figures and answers."""
    from conftest import write_pairs
    import yaml

    root = tmp_path_factory.mktemp("compare")
    data = write_pairs(root / "pairs.json", n=24)
    runs = []
    for name, lr in (("fast", 1e-3), ("slow", 1e-4)):
        cfg = {"project": "proj", "name": name, "mode": "train", "algorithm": {"algorithm_type": "dpo"},
               "checkpoint_root_dir": str(root / "ckpt"), "model": {"model_path": str(qwen_dir)},
               "buffer": {"total_epochs": 1, "batch_size": 8, "trainer_input": {"eval_fraction": 0.25,
                          "experience_buffer": {"path": str(data), "format": {"prompt_type": "plaintext"}}}},
               "trainer": {"total_steps": 2, "eval_samples": 1, "eval_max_new_tokens": 4, "precision": "fp32"}}
        cfg["algorithm"]["optimizer"] = {"lr": lr}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        runs.append(train.run(load_config(path)))
    return runs


def test_the_page_sets_the_runs_side_by_side(two_runs, tmp_path, capsys):
    page = tmp_path / "page.html"
    assert cli.main(["report", *map(str, two_runs), "-o", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text()
    assert "<b>fast</b>" in text and "<b>slow</b>" in text
    settings = text[text.index("Settings that differ"):text.index("Final held-out figures")]
    assert "algorithm.optimizer.lr" in settings and "0.001" in settings and "0.0001" in settings
    finals = text[text.index("Final held-out figures"):text.index("<h2>Curves")]
    assert len(re.findall(r"<td>\d+\.\d{4}</td>", finals)) >= 8  # loss, accuracies, margins... for both runs
    assert text.count("data:image/png;base64,") >= 4  # loss, accuracy, margin, lr at least
    answers = text[text.index("Answers to the same held-out prompts"):]
    assert answers.count("<tr>") == 2  # the header and the one shared held-out prompt


def test_one_run_keeps_its_own_report_and_a_folder_without_metrics_is_one_line(two_runs, tmp_path, capsys):
    assert cli.main(["report", str(two_runs[0])]) == 0
    assert (two_runs[0] / "report.html").is_file()
    assert cli.main(["report", str(two_runs[0]), str(tmp_path), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no metrics.jsonl here; give run folders" in err and "\n" not in err


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_loads_in_headless_chromium_with_every_image_and_no_script_error(two_runs, tmp_path):
    """The page as a browser shows it: every chart drawn (the page counts its drawable images), no script error
    in the console, and a screenshot of it rendered."""
    page = tmp_path / "page.html"
    assert cli.main(["report", *map(str, two_runs), "-o", str(page)]) == 0
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=5000", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert loaded and loaded.group(1) == loaded.group(2) and int(loaded.group(2)) >= 4, dom.stdout[-500:]
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr.upper().replace("CONSOLE_", ""), \
        dom.stderr[-2000:]
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1400,2400", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, text=True, timeout=120, check=True)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_runs_are_told_apart_by_the_shortest_distinct_end_of_their_paths(tmp_path):
    """Two folders named alike under projects named alike take as much of their paths as tells them apart; the
    same folder given twice is numbered (they were labelled alike in the list, the tables and the legends)."""
    from trinity_dpo.run.compare import _labels

    a, b, c = (tmp_path / "x" / "proj" / "full", tmp_path / "y" / "proj" / "full", tmp_path / "y" / "proj" / "lora")
    assert _labels([{"dir": p} for p in (a, b, c)]) == ["x/proj/full", "y/proj/full", "lora"]
    assert _labels([{"dir": a}, {"dir": a}]) == ["full (1)", "full (2)"]
