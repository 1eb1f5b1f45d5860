"""benchmarks/nano_denoise.py scores one-step predictions of real nano weights by noise level."""

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def denoise():
    return load_benchmark("nano_denoise")


def test_one_step_predictions_degrade_with_noise(denoise, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    denoise.main(["--world", "shapes", "--n", "6", "--sigmas", "0.05,0.99", "--threads", "1",
                  "--grid", str(tmp_path / "x0.png")])
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ground truth: shapes reward 1.000 (6 held-out prompts)" in out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| 0")]
    (lo, lo_mse, lo_score), (hi, hi_mse, hi_score) = rows
    assert (lo, hi) == ("0.05", "0.99")
    assert float(lo_score) == 1.0 and float(lo_mse) < 0.01  # nearly clean: the scenes survive
    assert float(hi_mse) > 10 * float(lo_mse) and float(hi_score) < float(lo_score)
    from PIL import Image

    assert Image.open(tmp_path / "x0.png").size == (8 * 66, 3 * 66)  # ground truth + two sigmas


def test_wrong_world_or_folder_is_one_line(denoise, tmp_path, capsys):
    from dgpo_bench_backbones.nano.model import default_weights_dir

    with pytest.raises(SystemExit):
        denoise.main(["--world", "text", "--weights", str(default_weights_dir("shapes"))])
    assert "holds shapes-world weights; pass --world shapes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        denoise.main(["--world", "shapes", "--weights", str(tmp_path)])
    assert "is not a nano weights folder" in capsys.readouterr().err
