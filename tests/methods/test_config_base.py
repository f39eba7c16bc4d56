"""The fields and checks every method config shares (``methods/config_base.py``)."""

from dataclasses import dataclass

import pytest

from pyramid_peft import EptConfig, MultiLoraConfig
from pyramid_peft.methods.config_base import RoutedConfig, check_choice, check_dropout, check_positive


def test_check_choice_suggests_the_closest_option():
    check_choice("gate_form", "code", ("paper", "code"))
    with pytest.raises(ValueError, match=r"gate_form='cod' is not one of \['paper', 'code'\]. Did you mean 'code'"):
        check_choice("gate_form", "cod", ("paper", "code"))


@pytest.mark.parametrize("value", [0.0, 0.5, 0.999])
def test_check_dropout_accepts_probabilities_below_one(value):
    check_dropout(value)


@pytest.mark.parametrize("value", [-0.1, 1.0, 2, "0.1", None])
def test_check_dropout_refuses_the_rest_by_name(value):
    with pytest.raises(ValueError, match=r"jitter_noise=.* must be in \[0, 1\)"):
        check_dropout(value, "jitter_noise")


def test_check_positive():
    check_positive("r", 1)
    for value in (0, -2, None):
        with pytest.raises(ValueError, match="r=.* must be positive"):
            check_positive("r", value)


def test_shared_fields_are_normalised_and_checked():
    config = MultiLoraConfig(target_modules=["q", "v"], exclude_modules=["lm_head"], num_tasks=3)
    assert config.target_modules == {"q", "v"} and config.exclude_modules == {"lm_head"}
    assert config.peft_type == "MULTILORA"
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_tasks=.* must be a positive integer"):
            EptConfig(target_modules=["q"], num_tasks=bad)
    assert RoutedConfig.aux_loss_weights(config) == {}


def test_an_unregistered_config_says_how_to_register():
    @dataclass
    class Unregistered(RoutedConfig):
        pass

    with pytest.raises(TypeError, match="register_method"):
        Unregistered(target_modules=["q"])
