"""LLaVA-format training data, one concern per module, in the order data flows through them.

* :mod:`~mmconnect.integrations.training.data.records` reads the LLaVA JSON format
  (docs/training.md, Data format) into :class:`LlavaRecord` objects and refuses anything that is
  not in that format, naming the record;
* :mod:`~mmconnect.integrations.training.data.templates` renders a conversation as text segments,
  each marked supervised or not (``plain``, ``vicuna_v1``, ``llama_3``, ``chatml``; more through
  :func:`register_template`);
* :mod:`~mmconnect.integrations.training.data.encoding` tokenizes those segments one by one, so
  labels are built turn by turn (never from length arithmetic); each ``<image>`` becomes as many
  image tokens as the connector produces;
* :mod:`~mmconnect.integrations.training.data.images` loads images and pads them to a square;
* :mod:`~mmconnect.integrations.training.data.validation` reports every record whose image is
  missing or unreadable, whose ``<image>`` count does not match or whose supervision truncation
  would remove; it never drops anything silently;
* :mod:`~mmconnect.integrations.training.data.dataset` yields ``{"input_ids", "labels",
  "pixel_values"}`` per record and pads them into batches.

The names below are re-exported here, so ``from mmconnect.integrations.training.data import
LlavaDataset`` is all a training script needs. Needs the ``hf`` extra (PIL, transformers'
tokenizers).

Examples:
    >>> records = load_llava_json("llava_v1_5_mix665k.json")  # doctest: +SKIP
    >>> dataset = LlavaDataset(
    ...     records,
    ...     image_folder="data/",
    ...     template="vicuna_v1",
    ...     tokenizer=processor.tokenizer,
    ...     image_processor=processor.image_processor,
    ...     image_tokens=model.model.image_token_count(),
    ...     image_token_id=model.config.image_token_id,
    ...     max_length=2048,
    ... )  # doctest: +SKIP
    >>> dataset.validate().raise_if_any()  # doctest: +SKIP
    >>> collator = DataCollator.from_tokenizer(processor.tokenizer)  # doctest: +SKIP
    >>> batch = collator([dataset[0], dataset[1]])  # doctest: +SKIP
"""

from mmconnect.integrations.training.data.dataset import DataCollator, LlavaDataset
from mmconnect.integrations.training.data.encoding import (
    IGNORE_INDEX,
    ConversationEncoder,
    EncodedConversation,
)
from mmconnect.integrations.training.data.images import load_image, pad_to_square
from mmconnect.integrations.training.data.records import (
    IMAGE_PLACEHOLDER,
    ROLES,
    LlavaRecord,
    Turn,
    load_llava_json,
    parse_llava_records,
)
from mmconnect.integrations.training.data.templates import (
    ChatTemplate,
    Segment,
    get_template,
    list_templates,
    register_template,
)
from mmconnect.integrations.training.data.validation import (
    DataProblem,
    ValidationReport,
    validate_records,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "ROLES",
    "ChatTemplate",
    "ConversationEncoder",
    "DataCollator",
    "DataProblem",
    "EncodedConversation",
    "LlavaDataset",
    "LlavaRecord",
    "Segment",
    "Turn",
    "ValidationReport",
    "get_template",
    "list_templates",
    "load_image",
    "load_llava_json",
    "pad_to_square",
    "parse_llava_records",
    "register_template",
    "validate_records",
]
