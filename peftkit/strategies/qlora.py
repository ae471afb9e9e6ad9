"""QLoRA = LoRA over a 4-bit (nf4, double-quantized) backbone. Only configuration differs."""

from typing import Literal

from .lora import Lora, LoraConfig


class QLoraConfig(LoraConfig):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    gradient_checkpointing: bool = False  # passed to prepare_model_for_kbit_training


class QLora(Lora):
    name = "qlora"
    Config = QLoraConfig
    needs_quantized = True
    default_quantization = "4bit"

    def prepare(self, model):
        import peft

        # Casts norms/head to fp32 and enables input grads so LoRA in early layers learns.
        return peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=self.cfg.gradient_checkpointing
        )
