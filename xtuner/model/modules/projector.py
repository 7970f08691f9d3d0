"""The LLaVA projector: maps vision-encoder features into the language model's embedding space.

``Linear(visual_hidden_size -> llm_hidden_size)`` followed by ``depth - 1`` times
``(activation, Linear(llm_hidden_size -> llm_hidden_size))``. The layers live in
``self.model`` (an ``nn.Sequential``), so parameter names are ``model.0.weight``,
``model.2.weight``, ... as in XTuner 0.x checkpoints. It is a ``PreTrainedModel`` so that the
``xtuner`` save format can write it with ``save_pretrained`` and read it back with
``ProjectorModel.from_pretrained``.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN


class ProjectorConfig(PretrainedConfig):
    """Configuration of :class:`ProjectorModel`.

    Args:
        visual_hidden_size: feature size of the vision encoder.
        llm_hidden_size: hidden size of the language model.
        depth: number of Linear layers (at least 1).
        hidden_act: activation between the Linear layers (a ``transformers`` ACT2FN name).
        bias: whether the Linear layers have a bias.
    """

    model_type = "xtuner_projector"

    def __init__(
        self,
        visual_hidden_size: int = 4096,
        llm_hidden_size: int = 4096,
        depth: int = 2,
        hidden_act: str = "gelu",
        bias: bool = True,
        **kwargs,
    ):
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        self.visual_hidden_size = visual_hidden_size
        self.llm_hidden_size = llm_hidden_size
        self.depth = depth
        self.hidden_act = hidden_act
        self.bias = bias
        super().__init__(**kwargs)


class ProjectorModel(PreTrainedModel):
    """The projector (see the module docstring)."""

    config_class = ProjectorConfig
    base_model_prefix = "model"
    main_input_name = "image_features"
    supports_gradient_checkpointing = False

    def __init__(self, config: ProjectorConfig):
        super().__init__(config)
        layers: list[nn.Module] = [
            nn.Linear(config.visual_hidden_size, config.llm_hidden_size, bias=config.bias)
        ]
        for _ in range(config.depth - 1):
            layers.append(ACT2FN[config.hidden_act])
            layers.append(
                nn.Linear(config.llm_hidden_size, config.llm_hidden_size, bias=config.bias)
            )
        self.model = nn.Sequential(*layers)
        self.post_init()

    def forward(self, image_features: Tensor) -> Tensor:
        """Projects ``[..., visual_hidden_size]`` features to ``[..., llm_hidden_size]``."""
        return self.model(image_features)
