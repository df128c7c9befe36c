"""Distillation under Lightning DDP (2 CPU processes, gloo) gives the one-process predictor."""
import subprocess
import sys
import textwrap

import torch

from amedlab.amed import AMEDPredictor
from amedlab.amed.distill import distill
from amedlab.models.analytic import default_mixture

SETTINGS = dict(solver="amed_plugin", nfe=5, num_trajectories=128, batch_size=32, epochs=1, seed=3)


def test_ddp_two_processes_match_one_process(tmp_path):
    script = tmp_path / "ddp_distill.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from amedlab.amed.distill import distill
        from amedlab.models.analytic import default_mixture
        pred = distill(default_mixture().float(), cache_dir={str(tmp_path / 'cache')!r}, accelerator="cpu",
                       devices=2, strategy="ddp", **{SETTINGS!r})
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            assert pred.meta["world_size"] == 2
            pred.save({str(tmp_path / 'ddp.pt')!r})
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = AMEDPredictor.load(tmp_path / "ddp.pt")
    single = distill(default_mixture().float(), cache_dir=tmp_path / "cache", **SETTINGS)
    assert single.meta["world_size"] == 1 and ddp.meta["updates"] == single.meta["updates"] == 4 * 3
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # and training did move the weights (the comparison is not between two untouched initialisations)
    torch.manual_seed(3)
    init = AMEDPredictor(feature_dim=4, s_dir=single.s_dir, s_time=single.s_time)
    assert (init.head_r.weight - single.head_r.weight).abs().max() > 1e-3
