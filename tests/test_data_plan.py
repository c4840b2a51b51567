"""The data plan (mu_runner/data/plan.py): every method in conf/method/*.yaml reads only the splits its
`data_plan()` declares, and never the test split."""

from __future__ import annotations

import pytest
from conftest import METHODS, fit_recording_loaders

from mu_runner.run import _target_class

PLAN_VARIANTS = [(m, ()) for m in METHODS] + [
    ("grad_ascent", ("forget=random", "forget.fraction=0.1")),  # its stopping rule reads validation images
    ("ssd", ("forget=random", "forget.fraction=0.1")),
    ("ssd", ("method.alpha_grid=null",)),  # the fixed α: no validation images
    ("dlfd", ("forget=random", "forget.fraction=0.1")),
    ("mnemonic", ("method.selection=codes",)),  # data-free: no split at all
    ("salun", ("method.schedule=mixed",)),
    ("random_label", ("method.schedule=sequential", "method.relabel=nearest_wrong")),
    ("scrub", ("method.max_steps=0",)),  # no max pass: D_f is not declared
    ("snu", ("method.noise_mode=gaussian_on_forget",)),
    ("weight_reset", ("method.score=magnitude",)),  # class-agnostic: D_f is not declared
    ("weight_reset", ("method.score=grad_ratio", "method.recalibrate_bn=true")),
]


class Forbidden:
    """Stands in for a split the plan does not declare (or the test split): every use is logged and refused."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def to(self, *args, **kwargs):  # moving the data to the device reads nothing
        return self

    def _refuse(self, *args, **kwargs):
        self.log.append(self.name)
        raise AssertionError(f"split {self.name} read without being declared in the data plan")

    __getitem__ = __len__ = __iter__ = __index__ = __array__ = __bool__ = __eq__ = __ne__ = _refuse
    __hash__ = None

    def __getattr__(self, attr):
        return self._refuse()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        found = [a for a in [*args, *(a for seq in args if isinstance(seq, (list, tuple)) for a in seq)]
                 if isinstance(a, Forbidden)]
        return found[0]._refuse()


@pytest.fixture(scope="session")
def plan_cache(tmp_path_factory):
    """Originals trained with 3 batches an epoch: kept apart from the run's shared cache."""
    from conftest import across_workers
    return across_workers(tmp_path_factory, "plan_cache")


@pytest.mark.parametrize("method, overrides", PLAN_VARIANTS, ids=[" ".join([m, *o]) for m, o in PLAN_VARIANTS])
def test_method_reads_only_the_splits_its_data_plan_declares(method, overrides, plan_cache, tmp_path):
    """Every split a method's plan leaves out (and the test split, always) is replaced by a stand-in that
    refuses any use, in the data itself, so that neither the method's view nor a detour around it reaches
    it; the view refuses undeclared splits too, and every loader built holds declared images only."""
    import torch

    from mu_runner.data.plan import SPLITS

    refused: list[str] = []
    seen: dict = {}

    def poison(stage):
        plan = seen["plan"] = stage.module.data_plan()
        assert set(plan.names) <= set(SPLITS) and "test" not in plan.names
        seen["allowed"] = torch.cat([stage.datamodule.indices(n) for n in plan.names] or [torch.empty(0).long()])
        data, split, names = stage.data, stage.split, set(plan.names)
        data.test_images, data.test_labels = Forbidden("test", refused), Forbidden("test", refused)
        if "val" not in names:
            data.val = Forbidden("val", refused)
        if not names & {"train"}:
            data.pool = Forbidden("train", refused)
            if "forget" not in names:
                split.forget = Forbidden("forget", refused)
            if "retain" not in names:
                split.retain = Forbidden("retain", refused)

    stage, loaders = fit_recording_loaders([f"method={method}", *(() if "forget=random" in overrides else ("forget.k=1",)),
                                            *overrides, "reference=none",
                                            "callbacks=none", "+trainer.limit_train_batches=3",
                                            f"paths.cache_dir={plan_cache}"], tmp_path, before_fit=poison)
    view, plan = stage.datamodule.method_data, seen["plan"]
    assert view.plan == plan and not refused and not view.refused, (refused, view.refused)
    assert view.touched <= set(plan.names)
    assert all(torch.isin(ix, seen["allowed"]).all() for ix in loaders)  # every loader: declared images only
    # validate.py refuses data.val_fraction=0 up front exactly for the settings that read validation images
    use = _target_class(stage.cfg.method).validation_use(stage.cfg.method, stage.cfg.forget.kind)
    assert ("val" in view.touched) <= (use is not None) <= ("val" in plan.names)


def test_a_view_refuses_undeclared_splits_and_images_outside_the_declared_ones(tiny):
    from mu_runner.data.datamodule import StageData
    from mu_runner.data.plan import DataPlan, SplitSpec, UndeclaredSplitError
    from mu_runner.run import load_data, make_split

    cfg = tiny("forget.k=1")
    data = load_data(cfg)
    stage = StageData(data, make_split(cfg, data))
    view = stage.attach(DataPlan((SplitSpec("forget", 8), SplitSpec("val")), anchor="forget"))
    assert len(view.labels(view.indices("forget"))) == len(stage.split.forget) and view.touched == {"forget"}
    for read in (lambda: view.indices("retain"), lambda: view.batches("train"),
                 lambda: view.images(stage.split.retain[:3]), lambda: view.accuracy(None, stage.split.retain)):
        with pytest.raises(UndeclaredSplitError):
            read()
    assert view.refused == ["retain", "train", "images", "images"]
    with pytest.raises(ValueError, match="the test split is the evaluator's"):
        SplitSpec("test", 8)
    with pytest.raises(ValueError, match="anchor"):
        DataPlan((SplitSpec("forget", 8), SplitSpec("retain", 8)))
    prepare_view = StageData(data, None).attach(DataPlan((SplitSpec("val"),)))
    with pytest.raises(UndeclaredSplitError):
        _ = prepare_view.forget_classes
