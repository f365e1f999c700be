"""The contract every Dense model family keeps, as a mixin its tester class inherits.

A family's tester (see ``test_family_contract.py``) names the family's classes and the exact
values it expects (tower geometry, image-token counts per sample image, the pixel side the
model takes) and builds its tiny parts through a few hooks:

* :meth:`FamilyContractTests.stock_config`: the stock HF config (``LlavaConfig`` ...) of tiny
  parts; the Dense config is made from it, so the attribute-parity test compares like for like;
* :meth:`FamilyContractTests.dense_fields`: the Dense config's fields the stock one lacks
  (Mini-Gemini's HR encoder), besides ``connector``;
* :meth:`FamilyContractTests.connector`: the connector configs the tests use (``"dense"``, the
  model's; ``"baseline"``, parameters of other shapes; ``"same_shapes"``, the same shapes with
  another meaning), each fitting the towers;
* :meth:`FamilyContractTests.processor`: the family's processor for a connector.

The mixin then checks, for every family alike: the family protocol
(:mod:`mmconnect.integrations.families.protocol`), the processor's image-token counts,
``generate()`` against ``forward``, ``save_pretrained`` + Auto reload in a fresh process, the
errors for wrong prompts, pixels, connectors and checkpoints, and attribute parity with the
stock HF classes (so a Dense ``__init__`` written by hand cannot drift from the stock one).
"""

from __future__ import annotations

import abc
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PreTrainedConfig

from mmconnect import ConnectorConfig, DenseConnector

#: Config keys that say what a config is rather than what it holds.
_IDENTITY_KEYS = frozenset({"model_type", "architectures", "transformers_version", "_name_or_path"})

#: The fresh process of the reload test: ``import mmconnect.integrations`` only, then the Auto
#: classes. It runs the saved input through the reloaded model and the saved images through the
#: reloaded processor and writes both results.
_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import mmconnect.integrations  # registers the Dense families with the Auto classes

    directory, request_file, output_file = sys.argv[1:4]
    torch.set_num_threads(int(sys.argv[4]))
    request = json.loads(open(request_file).read())
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    with torch.no_grad():
        logits = model(**load_file(request["inputs"])).logits
    images = [Image.open(path).convert("RGB") for path in request["images"]]
    processed = processor(images=images, text=request["texts"], return_tensors="pt", padding=True)
    tensors = {"logits": logits.contiguous()}
    tensors |= {"processor." + key: value.contiguous() for key, value in processed.items()}
    save_file(tensors, output_file)
    print(json.dumps({"model": type(model).__name__, "processor": type(processor).__name__}))
    """
)


def sample_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A random RGB image of ``(height, width)`` pixels (uint8 noise, ``seed``)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _public_attributes(module: nn.Module) -> dict[str, Any]:
    """A module's plain instance attributes (``vocab_size``, ``loss_type`` ...): what an
    ``__init__`` sets besides submodules and parameters, the config left out."""
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and name != "config"
    }


def _parameter_shapes(module: nn.Module, skip: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {
        name: tuple(parameter.shape)
        for name, parameter in module.named_parameters()
        if not name.startswith(skip)
    }


class FamilyContractTests(abc.ABC):
    """The shared contract tests of a Dense model family; a family's tester inherits them.

    Class attributes the tester sets (exact expected values, not computed by the code under
    test):

    Attributes:
        model_type: the family's ``model_type`` (``"dense_llava"``).
        config_class, model_class, generation_class, processor_class: its Dense HF classes.
        stock_model_class, stock_generation_class: the stock HF classes it extends
            (``LlavaModel``, ``LlavaForConditionalGeneration``).
        vision_tower_names: ``vision_towers()``'s keys, the tapped tower first.
        connector_module_names: ``connector_modules()``'s keys.
        extra_children: the inner model's children the stock model lacks (Mini-Gemini's HR
            tower and mining); everything else must match the stock model.
        geometry: ``tower_geometry()`` as the tester's vision config defines it.
        pixel_side: the square side of the ``pixel_values`` the model takes.
        image_sizes: ``(height, width)`` of the sample images (several, so AnyRes families
            count several sizes in one batch).
        token_counts: ``image_token_count(size)`` of each sample image.
        fixed_image_tokens: the registered family's ``fixed_image_tokens`` (``False``: AnyRes).
        frames_are_images: a video frame takes the image path (``False`` for AnyRes, whose
            frames skip the tiling).
        frame_tokens: tokens per video frame (``frame_features``).
        derived_config_keys: stock config keys whose value the Dense config derives from its
            connector (``image_seq_length``).
        extra_config_keys: the Dense config's keys the stock config lacks (``connector``).
    """

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    model_class: ClassVar[type]
    generation_class: ClassVar[type]
    processor_class: ClassVar[type]
    stock_model_class: ClassVar[type]
    stock_generation_class: ClassVar[type]
    vision_tower_names: ClassVar[tuple[str, ...]]
    connector_module_names: ClassVar[tuple[str, ...]]
    extra_children: ClassVar[frozenset[str]] = frozenset()
    geometry: ClassVar[Any]
    pixel_side: ClassVar[int]
    image_sizes: ClassVar[tuple[tuple[int, int], ...]]
    token_counts: ClassVar[tuple[int, ...]]
    fixed_image_tokens: ClassVar[bool] = True
    frames_are_images: ClassVar[bool] = True
    frame_tokens: ClassVar[int]
    derived_config_keys: ClassVar[frozenset[str]] = frozenset({"image_seq_length"})
    extra_config_keys: ClassVar[frozenset[str]] = frozenset({"connector"})
    #: One prompt per image (``<image>`` where the image goes).
    prompt: ClassVar[str] = "USER : <image> what is in the image ASSISTANT :"

    # ------------------------------------------------------------------ hooks

    @abc.abstractmethod
    def stock_config(self) -> Any:
        """The stock HF config of the family's tiny parts (``LlavaConfig`` ...)."""

    def dense_fields(self) -> dict[str, Any]:
        """Fields of the Dense config the stock config lacks, besides ``connector``."""
        return {}

    @abc.abstractmethod
    def connector(self, kind: str) -> ConnectorConfig:
        """``"dense"``: the model's connector (multi-layer); ``"baseline"``: one whose connector
        parameters have other shapes; ``"same_shapes"``: other meaning, the same shapes."""

    @abc.abstractmethod
    def processor(self, connector: ConnectorConfig) -> Any:
        """The family's processor for ``connector``, matching :meth:`stock_config`'s towers."""

    # ------------------------------------------------------------------ helpers

    def dense_config(self, connector: ConnectorConfig | None) -> Any:
        """The Dense config of :meth:`stock_config` with ``connector`` (``None``: the family's
        default, LLaVA's one-layer projector)."""
        data = self.stock_config().to_dict()
        for key in _IDENTITY_KEYS:
            data.pop(key, None)
        return self.config_class(
            **data,
            **self.dense_fields(),
            connector=None if connector is None else connector.to_dict(),
        )

    def build(self, connector: ConnectorConfig | None = None, seed: int = 0) -> Any:
        """The family's ``*ForConditionalGeneration`` (``seed``, eval mode)."""
        config = self.dense_config(connector)
        torch.manual_seed(seed)
        return self.generation_class(config).eval()

    def images(self) -> list[Image.Image]:
        """One random image per :attr:`image_sizes` entry."""
        return [sample_image(size, seed) for seed, size in enumerate(self.image_sizes)]

    def image_token_id(self, processor: Any) -> int:
        """The id of the processor's image placeholder token."""
        return processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    # ------------------------------------------------------------------ fixtures

    # Class-scoped fixtures run once per tester class: they are classmethods that call the hooks
    # on a fresh instance (pytest gives every test method its own instance).

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls) -> Any:
        tester = cls()
        return tester.build(tester.connector("dense"))

    @pytest.fixture(scope="class")
    @classmethod
    def family_processor(cls) -> Any:
        tester = cls()
        return tester.processor(tester.connector("dense"))

    @pytest.fixture(scope="class")
    @classmethod
    def single(cls, family_processor) -> dict[str, torch.Tensor]:
        """The processor's inputs for the first sample image and :attr:`prompt`."""
        images = cls().images()[:1]
        return dict(family_processor(images=images, text=[cls.prompt], return_tensors="pt"))

    @pytest.fixture(scope="class")
    @classmethod
    def saved(cls, model, tmp_path_factory) -> Path:
        """:meth:`model` written by ``save_pretrained``."""
        directory = tmp_path_factory.mktemp(f"{cls.model_type}_saved")
        model.save_pretrained(directory)
        return directory

    # ------------------------------------------------------------------ 1. the protocol

    def test_family_model_finds_the_inner_model(self, model) -> None:
        from mmconnect.integrations.families.protocol import (
            DenseFamilyModel,
            family_model,
            generation_model,
        )

        assert isinstance(model.model, self.model_class)
        assert isinstance(model.model, DenseFamilyModel)
        assert family_model(model) is model.model
        assert family_model(model.model) is model.model
        assert model.model.model_type == self.model_type
        with pytest.raises(TypeError, match=r"Linear is not a Dense model of a registered family"):
            family_model(nn.Linear(2, 2))
        assert generation_model(model) is model
        with pytest.raises(TypeError, match=rf"must be a {self.generation_class.__name__}"):
            generation_model(model.model)

    def test_family_model_through_peft_lora(self) -> None:
        peft = pytest.importorskip("peft")
        from mmconnect.integrations.families.protocol import family_model, generation_model

        model = self.build(self.connector("dense"))
        inner = model.model
        wrapped = peft.get_peft_model(
            model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
        )
        assert isinstance(wrapped, peft.PeftModel)
        assert wrapped.get_base_model() is model
        assert family_model(wrapped) is inner
        assert generation_model(wrapped) is wrapped

    def test_registered_family_has_the_model_classes(self, model, family_processor) -> None:
        from mmconnect.integrations.families.protocol import get_family, list_families

        assert model.config.model_type == self.model_type
        assert self.model_type in list_families()
        family = get_family(model.config.model_type)
        assert family.model_type == self.model_type
        assert (
            family.config_class,
            family.model_class,
            family.generation_class,
            family.processor_class,
        ) == (self.config_class, self.model_class, self.generation_class, self.processor_class)
        assert type(model) is family.generation_class
        assert type(model.model) is family.model_class
        assert type(model.config) is family.config_class
        assert type(family_processor) is family.processor_class
        assert family.fixed_image_tokens is self.fixed_image_tokens

    def test_tower_geometry_is_the_vision_config(self, model) -> None:
        inner = model.model
        geometry = inner.tower_geometry()
        assert geometry == self.geometry
        vision = model.config.vision_config
        assert (geometry.width, geometry.depth) == (vision.hidden_size, vision.num_hidden_layers)
        side = vision.image_size // vision.patch_size
        assert geometry.grid == (side, side)
        assert geometry.image_size == (vision.image_size, vision.image_size)
        connector = inner.connector.config
        assert (connector.vision_dim, connector.num_layers) == (geometry.width, geometry.depth)

    def test_vision_towers_and_connector_modules(self, model) -> None:
        inner = model.model
        towers = inner.vision_towers()
        assert tuple(towers) == self.vision_tower_names
        assert all(towers[name] is getattr(inner, name) for name in towers)
        assert inner.tapped_tower() is towers[self.vision_tower_names[0]]
        modules = inner.connector_modules()
        assert tuple(modules) == self.connector_module_names
        assert all(modules[name] is getattr(inner, name) for name in modules)
        assert isinstance(inner.connector, DenseConnector)
        assert any(module is inner.connector for module in modules.values())
        assert model.connector is inner.connector

    # ------------------------------------------------------------------ 2. processor counts

    def test_processor_puts_image_token_count_tokens_per_image(
        self, model, family_processor
    ) -> None:
        inner = model.model
        assert [inner.image_token_count(size) for size in self.image_sizes] == list(
            self.token_counts
        )
        images = self.images()
        batch = family_processor(
            images=images,
            text=[self.prompt] * len(images),
            return_tensors="pt",
            padding=True,
        )
        image_token = self.image_token_id(family_processor)
        assert image_token == model.config.image_token_id
        counts = (batch["input_ids"] == image_token).sum(dim=1).tolist()
        assert counts == list(self.token_counts)
        assert tuple(batch["pixel_values"].shape[-3:]) == (3, self.pixel_side, self.pixel_side)
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
        assert torch.isfinite(logits).all()

    # ------------------------------------------------------------------ image and frame paths

    def test_image_features_are_what_forward_embeds(self, model, family_processor, single):
        """The protocol's one-image path (chat) gives the tokens ``get_image_features`` gives
        for the processor's pixels."""
        inner = model.model
        image = self.images()[0]
        arguments = {key: single[key] for key in ("pixel_values", "image_sizes") if key in single}
        with torch.no_grad():
            features = inner.image_features(family_processor.image_processor, image)
            expected = inner.get_image_features(**arguments).pooler_output[0]
        assert features.shape == (1, self.token_counts[0], model.config.text_config.hidden_size)
        assert torch.equal(features[0], expected)

    def test_frame_features(self, model, family_processor):
        """Frames (video answering) are preprocessed to the model's input size and give
        ``frame_tokens`` each on the grid ``frame_grid()``; batched as one at a time."""
        inner = model.model
        frames = self.images()[:3]
        image_processor = family_processor.image_processor
        pixels = inner.frame_pixel_values(image_processor, frames)
        assert tuple(pixels.shape) == (3, 3, self.pixel_side, self.pixel_side)
        with torch.no_grad():
            features = inner.frame_features(pixels)
            alone = [inner.frame_features(pixels[index : index + 1])[0] for index in range(3)]
        hidden = model.config.text_config.hidden_size
        assert features.shape == (3, self.frame_tokens, hidden)
        for index in range(3):
            torch.testing.assert_close(features[index], alone[index], atol=1e-5, rtol=1e-5)
        assert inner.connector_input_grid() == self.geometry.grid
        assert inner.frame_grid() == inner.connector.token_grid(self.geometry.grid)
        if self.frames_are_images:
            with torch.no_grad():
                images = [inner.image_features(image_processor, frame)[0] for frame in frames]
            for index in range(3):
                torch.testing.assert_close(features[index], images[index], atol=1e-5, rtol=1e-5)

    # ------------------------------------------------------------------ 3. generate

    def test_generate_first_step_is_the_argmax_of_forward(self, model, single) -> None:
        with torch.no_grad():
            logits = model(**single).logits[:, -1]
        output = model.generate(
            **single,
            max_new_tokens=2,
            min_new_tokens=2,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        length = single["input_ids"].shape[1]
        assert output.sequences.shape == (1, length + 2)
        assert torch.equal(output.sequences[:, :length], single["input_ids"])
        assert output.sequences[0, length] == logits.argmax(-1)[0]
        torch.testing.assert_close(output.logits[0], logits, atol=1e-5, rtol=1e-5)

    # ------------------------------------------------------------------ 4. save and reload

    @pytest.mark.slow
    def test_save_and_auto_reload_in_a_fresh_process(
        self, model, family_processor, tmp_path
    ) -> None:
        from safetensors.torch import load_file, save_file

        directory = tmp_path / "saved"
        model.save_pretrained(directory)
        family_processor.save_pretrained(directory)
        paths = []
        for index, picture in enumerate(self.images()):
            paths.append(str(tmp_path / f"image{index}.png"))
            picture.save(paths[-1])
        images = [Image.open(path).convert("RGB") for path in paths]
        texts = [self.prompt] * len(images)
        inputs = dict(
            family_processor(images=images, text=texts, return_tensors="pt", padding=True)
        )
        save_file(inputs, tmp_path / "inputs.safetensors")
        with torch.no_grad():
            expected = model(**load_file(tmp_path / "inputs.safetensors")).logits
        request = {"inputs": str(tmp_path / "inputs.safetensors"), "images": paths, "texts": texts}
        (tmp_path / "request.json").write_text(json.dumps(request))
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                _RELOAD_SCRIPT,
                str(directory),
                str(tmp_path / "request.json"),
                str(tmp_path / "output.safetensors"),
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = json.loads(result.stdout.strip().splitlines()[-1])
        assert loaded == {
            "model": self.generation_class.__name__,
            "processor": self.processor_class.__name__,
        }
        output = load_file(tmp_path / "output.safetensors")
        assert torch.equal(output.pop("logits"), expected)
        assert sorted(output) == sorted(f"processor.{key}" for key in inputs)
        for key, value in inputs.items():
            assert torch.equal(output[f"processor.{key}"], value), key

    # ------------------------------------------------------------------ 5. bad input

    @pytest.mark.parametrize("change", [-1, 1])
    @pytest.mark.parametrize("call", ["forward", "generate"])
    def test_wrong_image_token_count_names_both_counts(self, model, single, change, call) -> None:
        image_token = model.config.image_token_id
        ids = single["input_ids"][0]
        expected = int((ids == image_token).sum())
        assert expected == self.token_counts[0]
        position = int((ids == image_token).nonzero()[0, 0])
        if change < 0:
            ids = torch.cat([ids[:position], ids[position + 1 :]])
        else:
            ids = torch.cat([ids[:position], ids[position : position + 1], ids[position:]])
        inputs = single | {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
        message = rf"holds {expected + change} image tokens but .*fill {expected}\b"
        with pytest.raises(ValueError, match=message):
            if call == "forward":
                model(**inputs)
            else:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)

    def test_wrong_pixel_size(self, model, single) -> None:
        patch = self.geometry.patch_size
        pixels = F.pad(single["pixel_values"], (0, patch, 0, patch))
        wrong = self.pixel_side + patch
        message = (
            rf"pixel_values must be \[\w+, 3, {self.pixel_side}, {self.pixel_side}\]"
            rf".*got shape \([^)]*\b{wrong}, {wrong}\)"
        )
        with pytest.raises(ValueError, match=message):
            model(**(single | {"pixel_values": pixels}))

    @pytest.mark.parametrize(
        ("field", "change"), [("vision_dim", 8), ("num_layers", 2), ("llm_dim", 8)]
    )
    def test_connector_that_does_not_fit_the_towers(self, field, change) -> None:
        connector = self.connector("dense")
        right = getattr(connector, field)
        wrong = connector.replace(**{field: right + change})
        message = rf"connector {field}={right + change} does not match .*\({right}\)"
        with pytest.raises(ValueError, match=message):
            self.build(wrong)

    # ------------------------------------------------------------------ 6. another connector

    def _refusal(self, kind: str) -> str:
        """What the refusal to load the ``"dense"`` weights into ``kind``'s config names."""
        if kind == "same_shapes":
            return re.escape("the weights were saved with a different connector config")
        with torch.device("meta"):
            saved = DenseConnector(self.connector("dense")).state_dict()
            wanted = DenseConnector(self.connector(kind)).state_dict()
        key, shape = next(
            (key, tuple(tensor.shape))
            for key, tensor in wanted.items()
            if key in saved and tuple(saved[key].shape) != tuple(tensor.shape)
        )
        return re.escape(
            f"{key}: {tuple(saved[key].shape)} in the weights, {shape} expected by the config"
        )

    @pytest.mark.parametrize("kind", ["baseline", "same_shapes"])
    def test_checkpoint_of_another_connector_in_config_json(self, saved, tmp_path, kind) -> None:
        from transformers import AutoModelForImageTextToText

        edited = shutil.copytree(saved, tmp_path / "edited")
        config_file = edited / "config.json"
        data = json.loads(config_file.read_text())
        data["connector"] = self.connector(kind).to_dict()
        config_file.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"do not match the connector config.*") as error:
            AutoModelForImageTextToText.from_pretrained(edited)
        assert re.search(self._refusal(kind), str(error.value)), str(error.value)

    @pytest.mark.parametrize("kind", ["baseline", "same_shapes"])
    def test_checkpoint_loaded_with_a_config_of_another_connector(self, saved, kind) -> None:
        from transformers import AutoModelForImageTextToText

        config = self.dense_config(self.connector(kind))
        with pytest.raises(ValueError, match=r"do not match the connector config.*") as error:
            AutoModelForImageTextToText.from_pretrained(saved, config=config)
        assert re.search(self._refusal(kind), str(error.value)), str(error.value)

    # ------------------------------------------------------------------ 7. stock parity

    def test_conversion_reports_what_the_source_runs_with(self) -> None:
        """``convert_to_dense`` around a stock model loaded with ``attn_implementation="eager"``:
        the Dense config holds the sub-configs its reused tower and LLM read (as the stock model
        does), so it reports eager, and ``set_attn_implementation`` reaches the modules."""
        from mmconnect.integrations.families.protocol import convert_to_dense, get_family

        if get_family(self.model_type).source_class is not self.stock_generation_class:
            pytest.skip(f"no stock class converts to {self.model_type}")
        torch.manual_seed(0)
        stock = self.stock_generation_class._from_config(
            self.stock_config(), attn_implementation="eager"
        ).eval()
        dense = convert_to_dense(stock, self.connector("dense"))
        assert type(dense) is self.generation_class
        for key in ("text_config", "vision_config"):
            assert getattr(dense.config, key) is getattr(stock.config, key), key
            assert getattr(dense.config, key)._attn_implementation == "eager", key
        assert dense.config._attn_implementation == stock.config._attn_implementation == "eager"
        # Every HF module reads the Dense config or one of its sub-configs, no stray copy.
        named = {id(dense.config)} | {
            id(getattr(dense.config, key)) for key in dense.config.sub_configs
        }
        stray = [
            name
            for name, module in dense.named_modules()
            if isinstance(getattr(module, "config", None), PreTrainedConfig)
            and id(module.config) not in named
        ]
        assert stray == []
        dense.set_attn_implementation("sdpa")
        running = {
            name: module.config._attn_implementation
            for name, module in dense.named_modules()
            if isinstance(getattr(module, "config", None), PreTrainedConfig)
        }
        assert set(running.values()) == {"sdpa"}, running

    def test_dense_config_carries_every_stock_attribute(self) -> None:
        stock = self.stock_config()
        dense = self.dense_config(None)
        stock_data, dense_data = stock.to_dict(), dense.to_dict()
        keys = set(stock_data) - _IDENTITY_KEYS
        assert [key for key in sorted(keys) if not hasattr(dense, key)] == []
        assert [key for key in sorted(keys) if key not in dense_data] == []
        differing = sorted(key for key in keys if dense_data[key] != stock_data[key])
        assert set(differing) <= self.derived_config_keys, differing
        assert set(dense_data) - set(stock_data) - _IDENTITY_KEYS == self.extra_config_keys

    def test_modules_and_parameters_match_the_stock_model(self) -> None:
        """Same children, same non-connector parameter names and shapes, same plain attributes
        as the stock HF model of the same config, in the inner model and the generation class."""
        stock_config = self.stock_config()
        torch.manual_seed(0)
        stock = self.stock_generation_class(stock_config).eval()
        dense = self.build(None)
        assert isinstance(stock.model, self.stock_model_class)
        inner = dense.model
        connector_name = next(
            name for name, module in inner.connector_modules().items() if module is inner.connector
        )
        stock_children = {name for name, _ in stock.model.named_children()}
        dense_children = {name for name, _ in inner.named_children()}
        assert connector_name in stock_children  # checkpoints keep HF's key prefix
        assert dense_children == stock_children | self.extra_children
        assert self.extra_children <= set(inner.vision_towers()) | set(inner.connector_modules())
        assert {name for name, _ in dense.named_children()} == {
            name for name, _ in stock.named_children()
        }
        skip = tuple(f"{name}." for name in (connector_name, *self.extra_children))
        assert _parameter_shapes(inner, skip) == _parameter_shapes(stock.model, skip)
        outer_skip = tuple(f"model.{prefix}" for prefix in skip)
        assert _parameter_shapes(dense, outer_skip) == _parameter_shapes(stock, outer_skip)
        assert _public_attributes(inner) == _public_attributes(stock.model)
        assert _public_attributes(dense).keys() == _public_attributes(stock).keys()
