"""The method registry: every method of it is installed, and its entries agree with the methods' configs."""

import pytest

from vqad_nerfstudio.codec import UnsupportedMethodError
from vqad_nerfstudio.export.formats import METHOD_FORMATS, method_format
from vqad_nerfstudio.export.methods import trainer_config, vqad_method_names


def test_every_registered_method_is_installed():
    assert vqad_method_names() == sorted(METHOD_FORMATS)


@pytest.mark.parametrize("method", sorted(METHOD_FORMATS))
def test_a_method_trains_the_model_of_its_format(method):
    entry = METHOD_FORMATS[method]
    model = trainer_config(method).pipeline.model
    assert issubclass(model._target, entry.model_type)
    # a model is written as its own method unless a sibling of the same config is the default (the -l variant)
    assert entry.default_for(model) == (method != "tensorf-compressed-l")


def test_unknown_methods_name_the_registered_ones():
    with pytest.raises(UnsupportedMethodError, match="unknown method 'nerfacto'.*vqad-hash"):
        method_format("nerfacto")
