import pytest
from pydantic import BaseModel, ConfigDict

from shared.config import apply_overrides, config_hash, load_config, parse_config
from shared.errors import InvalidArgument, NotFound


class Optim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "sgd"
    lr: float = 0.1


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = 1
    optimizer: Optim = Optim()
    tags: list[str] = []


def test_overrides_parse_values_as_yaml():
    out = apply_overrides({"optimizer": {"lr": 0.1}}, ["optimizer.lr=0.01", "tags=[a,b]", "new.deep.key=true"])
    assert out == {"optimizer": {"lr": 0.01}, "tags": ["a", "b"], "new": {"deep": {"key": True}}}


def test_load_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\noptimizer:\n  name: adamw\n")
    cfg = load_config(Cfg, path, ["optimizer.lr=0.001"])
    assert cfg.epochs == 3 and cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 0.001


@pytest.mark.parametrize(
    "overrides, fragment",
    [(["optimizer.lrr=1"], "optimizer.lrr"), (["epochs=many"], "epochs"), (["noequals"], "key.path=value"),
     (["a..b=1"], "empty key")],
)
def test_bad_configs_name_the_field(overrides, fragment):
    with pytest.raises(InvalidArgument, match=fragment.replace(".", r"\.")):
        parse_config(Cfg, {}, overrides)


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(Cfg()) == config_hash(Cfg())
    assert config_hash(Cfg()) != config_hash(Cfg(epochs=2))
