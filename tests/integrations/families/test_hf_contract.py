"""transformers' own common model, config and processor tests, run on the Dense families.

The test code is transformers' (``ModelTesterMixin`` and ``ConfigTester`` from the sdist of the
installed version, and ``ProcessorTesterMixin`` for the three processors, obtained by
:mod:`tests.hf_upstream` when this module is collected; skipped with the reason when the
package registry is unreachable); the testers here are ours: tiny
configs with a DCI Dense Connector in place of the stock projector, for Dense LLaVA, Dense
LLaVA-NeXT and Dense Mini-Gemini. Nothing of transformers' test code is copied.

What the sdist does not carry, and so does not run here:

* ``tests/generation/test_utils.py`` (``GenerationTesterMixin``: greedy / beam / assisted /
  compiled generation, caches): generation is covered by our family tests
  (``test_llava.py``, ``test_llava_next.py``, ``test_mgm_model.py``);
* ``tests/models/llava*/`` (the stock testers): the testers below are written here;
* ``tests/exporters/`` (``torch.export`` tests).

Adaptations (each an intended difference; everything else runs as upstream wrote it):

* the Dense classes are listed in transformers' model-name tables while these tests run
  (upstream tells base models from generation heads by those tables; ``AutoModel.register``
  does not list run-time registered classes there);
* ``test_all_params_have_gradient = False``: the tower's ``post_layernorm`` is off the image
  feature path, in stock LLaVA as well;
* LLaVA-NeXT: ``skip_test_image_features_output_shape``: ``last_hidden_state`` has one row per
  crop, as in stock LLaVA-NeXT;
* the tests in ``LEFT_OUT`` and ``PROCESSOR_LEFT_OUT`` (with the reason for each);
* ``ProcessorTesterMixin`` reads sample files through ``fetch_hub_objects_for_ci`` (transformers'
  ``utils/`` folder, not in the sdist, and the files come from the Hub): its image URLs map to
  synthetic images in the cache (:mod:`tests.hf_upstream`); the processors get a word-level
  tokenizer, a 28 px image processor (32 px HR for MGM) and a chat template.

Tests that need an accelerator, flash-attention, kernels, DeepSpeed, several devices or
offloading skip themselves on a CPU machine as upstream wrote them. Measured on 2 shared CPU
cores: 3.5 minutes for the three families and their processors (``slow``; 490 tests pass, 293
skip themselves), plus ~6 s to collect the module.
"""

from __future__ import annotations

import re
import unittest

import pytest
import torch

pytest.importorskip("transformers")

from tests.support.hf_upstream import UpstreamUnavailable, load_upstream_tests

try:
    load_upstream_tests()
except UpstreamUnavailable as error:  # no registry: nothing to run
    pytest.skip(f"transformers' test sources are unavailable: {error}", allow_module_level=True)

from hf_upstream_tests.test_configuration_common import ConfigTester
from hf_upstream_tests.test_modeling_common import (
    ModelTesterMixin,
    floats_tensor,
    ids_tensor,
)
from hf_upstream_tests.test_processing_common import ProcessorTesterMixin
from transformers import CLIPImageProcessor, LlavaNextImageProcessor
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from mmconnect import ConnectorConfig, DCISpec
from mmconnect.integrations.applications.tiny_models import tiny_llava_tokenizer
from mmconnect.integrations.families.anyres import anyres_token_count
from mmconnect.integrations.families.llava import (
    DenseLlavaConfig,
    DenseLlavaForConditionalGeneration,
    DenseLlavaModel,
    DenseLlavaProcessor,
)
from mmconnect.integrations.families.llava_next import (
    DenseLlavaNextConfig,
    DenseLlavaNextForConditionalGeneration,
    DenseLlavaNextModel,
    DenseLlavaNextProcessor,
)
from mmconnect.integrations.families.mini_gemini import (
    DenseMGMConfig,
    DenseMGMForConditionalGeneration,
    DenseMGMModel,
    DenseMGMProcessor,
)

pytestmark = pytest.mark.slow

#: Upstream tests not run, with the reason (see the module docstring).
LEFT_OUT = {
    "test_torch_exportable": "ExportTesterMixin (tests/exporters/) is not in the sdist",
    "test_generation_tester_mixin_inheritance": "GenerationTesterMixin is not in the sdist",
    "test_model_weights_reload_no_missing_tied_weights": (
        "intended difference: it loads a checkpoint with no weights at all and expects every "
        "weight to be re-initialised; Dense models refuse a checkpoint without its connector "
        "weights (HF would re-initialise them silently), see test_llava.py"
    ),
}

IMAGE_SIZE, PATCH, VISION_LAYERS = 28, 14, 2  # upstream wants at most 2 blocks per tower
IMAGE_TOKEN = 3


def dci_connector(vision_dim: int, llm_dim: int) -> ConnectorConfig:
    """DCI on a 2-block tower: final layer -2 (H[1]), groups {0} and {1, 2}."""
    return ConnectorConfig(
        fusion=DCISpec(final_layer=-2, groups=((0,), (1, 2))),
        vision_dim=vision_dim,
        llm_dim=llm_dim,
        num_layers=VISION_LAYERS,
    )


class DenseTester:
    """A tiny Dense model family for ``ModelTesterMixin``: CLIP tower (2 blocks, 28 px, patch
    14: a 2 x 2 grid), 2-layer Llama, DCI connector; the ``<image>`` tokens lead each prompt."""

    config_class: type = DenseLlavaConfig

    def __init__(self, parent: unittest.TestCase, batch_size: int = 3, text_length: int = 7):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = True
        self.vision_config = {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": VISION_LAYERS,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
            "num_channels": 3,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "initializer_range": 0.02,
        }
        self.text_config = {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 99,
            "max_position_embeddings": 512,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_act": "gelu",
            "initializer_range": 0.02,
        }
        # What the mixin reads about the LLM (hidden-state and attention counts, widths).
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.vocab_size = self.text_config["vocab_size"]
        self.pad_token_id = self.text_config["pad_token_id"]
        self.num_image_tokens = self.image_tokens()
        self.seq_length = text_length + self.num_image_tokens
        self.encoder_seq_length = self.seq_length

    def config_kwargs(self) -> dict:
        return {
            "vision_config": dict(self.vision_config),
            "text_config": dict(self.text_config),
            "image_token_id": IMAGE_TOKEN,
            "connector": dci_connector(32, 32).to_dict(),
        }

    def get_config(self):
        return self.config_class(**self.config_kwargs())

    def image_tokens(self) -> int:
        side = IMAGE_SIZE // PATCH
        return dci_connector(32, 32).num_tokens((side, side))

    def pixel_inputs(self) -> dict:
        return {
            "pixel_values": floats_tensor([self.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE]),
        }

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        input_ids[input_ids == IMAGE_TOKEN] = self.pad_token_id + 3  # only the leading ones
        input_ids[:, : self.num_image_tokens] = IMAGE_TOKEN
        attention_mask = torch.ones_like(input_ids)
        return config, {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **self.pixel_inputs(),
        }


class DenseNextTester(DenseTester):
    """The LLaVA-NeXT variant: 28 px tiles, pinpoints 56 x 56, every image 56 x 56 (1 base + 4
    tiles per image, ``[images, 5, 3, 28, 28]``)."""

    config_class = DenseLlavaNextConfig
    pinpoints = ((56, 56),)
    image_size = (56, 56)

    def config_kwargs(self) -> dict:
        return {
            **super().config_kwargs(),
            "image_grid_pinpoints": [list(p) for p in self.pinpoints],
        }

    def image_tokens(self) -> int:
        side = IMAGE_SIZE // PATCH
        return anyres_token_count(
            dci_connector(32, 32), self.image_size, self.pinpoints, IMAGE_SIZE, (side, side)
        )

    def pixel_inputs(self) -> dict:
        return {
            "pixel_values": floats_tensor([self.batch_size, 5, 3, IMAGE_SIZE, IMAGE_SIZE]),
            "image_sizes": torch.tensor([list(self.image_size)] * self.batch_size),
        }


class DenseMGMTester(DenseTester):
    """Mini-Gemini: the 32 px HR image feeds a 4-stage ConvNeXt (timm ``convnext_atto``, widths
    8 / 16 / 32 / 64, 8 x 8 HR cells) and, downsampled to 28 px, the CLIP tower; mining after
    the DCI fusion."""

    config_class = DenseMGMConfig
    image_size_aux = 32

    def config_kwargs(self) -> dict:
        return {
            **super().config_kwargs(),
            "aux_encoder": {"name": "convnext_atto", "dims": [8, 16, 32, 64], "depths": [1] * 4},
            "image_size_aux": self.image_size_aux,
        }

    def pixel_inputs(self) -> dict:
        size = self.image_size_aux
        return {"pixel_values": floats_tensor([self.batch_size, 3, size, size])}


class _ContractTests(ModelTesterMixin):
    """What both families share; subclasses name the tester, the classes and the model type."""

    family_tester: type = DenseTester
    config_class: type = DenseLlavaConfig
    _is_composite = True
    test_resize_embeddings = True
    # Adaptation: the tower's post_layernorm is off the image-feature path (in stock LLaVA as
    # well: with vision_feature_layer=-2 it and the last block get no gradient), so "every
    # parameter has a gradient" cannot hold for either.
    test_all_params_have_gradient = False

    @classmethod
    def setUpClass(cls) -> None:
        # Adaptation: upstream tells base models from generation heads by class name in
        # transformers' model-name tables (which decides labels and which classes train).
        # A model inside transformers is listed there; ours are registered with the Auto
        # classes at run time, which does not list them: list them while these tests run.
        super().setUpClass()
        model_type = cls.config_class.model_type
        base, head = cls.all_model_classes
        cls._listed = [
            (MODEL_MAPPING_NAMES, model_type, base.__name__),
            (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, model_type, head.__name__),
        ]
        for table, key, name in cls._listed:
            assert key not in table, f"{key} is already in transformers' tables"
            table[key] = name

    @classmethod
    def tearDownClass(cls) -> None:
        for table, key, _ in cls._listed:
            table.pop(key, None)
        super().tearDownClass()

    def setUp(self) -> None:
        self.model_tester = self.family_tester(self)
        self.config_tester = ConfigTester(
            self, config_class=self.config_class, has_text_modality=False
        )

    def test_config(self) -> None:
        self.config_tester.run_common_tests()


def _leave_out(cls: type, mixin: type = ModelTesterMixin, reasons: dict | None = None) -> type:
    for name, reason in (LEFT_OUT if reasons is None else reasons).items():
        assert hasattr(mixin, name), f"upstream has no {name} any more"
        setattr(cls, name, unittest.skip(reason)(lambda self: None))
    return cls


@_leave_out
class DenseLlavaContractTest(_ContractTests, unittest.TestCase):
    all_model_classes = (DenseLlavaModel, DenseLlavaForConditionalGeneration)
    family_tester = DenseTester
    config_class = DenseLlavaConfig


@_leave_out
class DenseLlavaNextContractTest(_ContractTests, unittest.TestCase):
    all_model_classes = (DenseLlavaNextModel, DenseLlavaNextForConditionalGeneration)
    family_tester = DenseNextTester
    config_class = DenseLlavaNextConfig
    # Adaptation: last_hidden_state has one row per crop ([crops, tokens, C], 5 crops per
    # image here), as in stock LLaVA-NeXT; upstream's shape check expects one row per image.
    skip_test_image_features_output_shape = True


@_leave_out
class DenseMGMContractTest(_ContractTests, unittest.TestCase):
    all_model_classes = (DenseMGMModel, DenseMGMForConditionalGeneration)
    family_tester = DenseMGMTester
    config_class = DenseMGMConfig


def test_unreachable_registry_is_a_clear_skip_reason(tmp_path, monkeypatch):
    """Without a registry the download fails with a message that says so (the module then
    skips with it) and leaves no half-extracted sources in the cache."""
    from tests.support import hf_upstream

    monkeypatch.setenv("MMCONNECT_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    import transformers

    expected = re.escape(f"`pip download transformers=={transformers.__version__}` failed")
    with pytest.raises(hf_upstream.UpstreamUnavailable, match=expected):
        hf_upstream.sdist_tests_dir()
    assert not any((tmp_path / "transformers-sdist").glob("transformers-*"))


# ---------------------------------------------------------------------------- processors

#: Upstream processor tests not run, with the reason.
PROCESSOR_LEFT_OUT = {
    "test_tokenizer_decode_defaults": (
        "intended difference: it builds the processor from its components alone; a Dense "
        "processor needs connector= and patch_size= (the image-token count depends on them)"
    ),
}

#: A chat template that places ``<image>`` where a message has an image part.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}\n{% endfor %}"
)


class _ProcessorContractTests(ProcessorTesterMixin):
    """A word-level tokenizer with ``<image>`` and a 28 px CLIP image processor."""

    @classmethod
    def _setup_image_processor(cls):
        return CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        )

    @classmethod
    def _setup_tokenizer(cls):
        return tiny_llava_tokenizer()

    @staticmethod
    def prepare_processor_dict() -> dict:
        return {
            "patch_size": PATCH,
            "connector": dci_connector(32, 32).to_dict(),
            "chat_template": CHAT_TEMPLATE,
        }


class DenseLlavaProcessorContractTest(_ProcessorContractTests, unittest.TestCase):
    processor_class = DenseLlavaProcessor


class DenseLlavaNextProcessorContractTest(_ProcessorContractTests, unittest.TestCase):
    processor_class = DenseLlavaNextProcessor

    @classmethod
    def _setup_image_processor(cls):
        return LlavaNextImageProcessor(
            image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]],
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        )


class DenseMGMProcessorContractTest(_ProcessorContractTests, unittest.TestCase):
    """The image processor makes the 32 px HR image."""

    processor_class = DenseMGMProcessor

    @classmethod
    def _setup_image_processor(cls):
        return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    @staticmethod
    def prepare_processor_dict() -> dict:
        return {
            **_ProcessorContractTests.prepare_processor_dict(),
            "image_size": IMAGE_SIZE,
            "image_size_aux": 32,
        }


for _processor_test in (
    DenseLlavaProcessorContractTest,
    DenseLlavaNextProcessorContractTest,
    DenseMGMProcessorContractTest,
):
    _leave_out(_processor_test, ProcessorTesterMixin, PROCESSOR_LEFT_OUT)
_leave_out(
    DenseLlavaNextProcessorContractTest,
    ProcessorTesterMixin,
    {
        "test_no_redundant_default_kwargs": (
            "inherited: the do_pad default comes from LlavaNextProcessor, which upstream exempts "
            "from this test by class name (kept for backward compatibility)"
        )
    },
)
