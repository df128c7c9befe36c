"""The typed specs between the config and the library (amedlab.specs): one translation from a
config, the predictor cache key unchanged, the paper's defaults read from conf/."""
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from amedlab.amed.distill import distill
from amedlab.specs import CONF_DIR
from amedlab.schedules import make_sigmas
from amedlab.specs import DistillSpec, ScheduleSpec, SolverSpec, distill_spec, paper_defaults


@pytest.mark.parametrize("overrides,key", [
    # digests computed with the code before the specs existed (evaluate.distill_settings + digest):
    # a predictor cached then is found again
    (["solver=amed", "schedule=time_uniform"], "b797608dbd4cbaeb81892c3b"),
    (["solver=amed_plugin_vs_traj", "schedule.rho=5", "nfe=7", "distill.epochs=4", "predictor.hidden_dim=64"],
     "d006b35797889788d7219d55"),
    (["experiments=table2_digits", "solver=amed", "nfe=3"], "3e530d0b94c6373c18c4fcee"),
])
def test_the_predictor_cache_key_is_unchanged(compose_cfg, overrides, key):
    from amedlab.evaluation.evaluate import cell_schedule

    cfg = compose_cfg(*overrides)
    node = OmegaConf.to_container(cfg.solver, resolve=True)
    schedule = cell_schedule(cfg.schedule, node["name"], cfg.eval.get("schedule_per_solver"))
    assert distill_spec(cfg, node, schedule).key("model-abc") == key


def test_the_papers_defaults_are_the_config_files():
    amed, plugin = paper_defaults("amed"), paper_defaults("amed_plugin")
    assert amed["teacher"] == {"name": "heun", "afs": False, "options": {}} and amed["M"] == 1
    assert (amed["s_dir"], amed["s_time"]) == (0.01, 0.0) and amed["solver_options"] == {}
    assert amed["schedule"] == {"kind": "time_uniform", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 1.0}
    assert plugin["teacher"] == {"name": "ipndm", "afs": False, "options": {"max_order": 4}} and plugin["M"] == 2
    assert (plugin["s_dir"], plugin["s_time"]) == (0.01, 0.2)
    assert plugin["solver_options"] == {"base": "ipndm", "max_order": 4} and plugin["schedule"]["rho"] == 7.0
    # the files are the source: the YAML's distill block is what the defaults hold
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "solver" / "amed_plugin.yaml"))
    assert {k: plugin[k] for k in ("teacher", "M", "s_dir", "s_time")} == node["distill"]
    paper_defaults("amed")["teacher"]["name"] = "euler"  # a copy: the cached defaults are not changed
    assert paper_defaults("amed")["teacher"]["name"] == "heun"
    with pytest.raises(ValueError, match="solver='euler' cannot be distilled; accepted: amed, amed_plugin"):
        paper_defaults("euler")


def test_resolved_fills_only_what_is_unset():
    spec = DistillSpec(solver="amed_plugin", M=4, schedule={"kind": "logsnr", "sigma_min": 0.01, "sigma_max": 10, "rho": 1})
    r = spec.resolved()
    assert r.M == 4 and r.s_time == 0.2 and r.teacher["name"] == "ipndm" and r.schedule["kind"] == "logsnr"
    assert r.objective == "interval" and r.intermediate_weight == 0.0
    assert "objective" not in spec.settings() and "objective" in DistillSpec(objective="trajectory").settings()


def test_distill_takes_a_spec_and_names_an_unknown_setting():
    params = inspect.signature(distill).parameters
    assert len([p for p in params.values() if p.kind is not p.VAR_KEYWORD]) <= 8
    with pytest.raises(ValueError, match="no setting num_trajectory; accepted: solver, nfe"):
        distill(None, num_trajectory=10)
    with pytest.raises(ValueError, match="solver='heun' cannot be distilled"):
        distill(None, DistillSpec(solver="heun"))


@pytest.mark.parametrize("name", ["polynomial", "time_uniform", "logsnr"])
def test_schedule_grid_is_make_sigmas(name):
    spec = ScheduleSpec.named(name)
    expected = make_sigmas(name, 6, 0.002, 80.0, 7.0 if name == "polynomial" else 1.0)
    assert torch.equal(spec.grid(6), expected)
    with pytest.raises(ValueError, match="schedule.rho=-1"):
        ScheduleSpec("polynomial", 0.002, 80.0, -1).grid(4)


def test_solver_spec_builds_counts_and_labels():
    ipndm = SolverSpec.named("ipndm")
    assert ipndm.build().name == "ipndm" and ipndm.num_points(5) == 6 and ipndm.label == "iPNDM"
    amed = SolverSpec.named("amed")
    assert amed.num_points(5) == 4 and amed.label == "AMED-Solver"  # no predictor needed to count
    assert SolverSpec.named("dpm2").label == "DPM-Solver-2 (AFS)"
    with pytest.raises(ValueError, match="reachable"):
        SolverSpec.named("heun").num_points(4)
