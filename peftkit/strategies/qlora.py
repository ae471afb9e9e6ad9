"""QLoRA = LoRA over a 4-bit (nf4, double-quantized) backbone. Only configuration differs."""

from typing import Literal

from peftkit.strategies.lora import Lora, LoraConfig


class QLoraConfig(LoraConfig):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    gradient_checkpointing: bool = False  # passed to prepare_model_for_kbit_training
    # peft's k-bit preparation casts every weight left unquantized (norms, embeddings, output layer) to
    # fp32, and so the residual stream too. false: they stay in model.dtype (torchtune's QLoRA): less memory.
    upcast_unquantized: bool = True


class QLora(Lora):
    name = "qlora"
    Config = QLoraConfig
    needs_quantized = True
    default_quantization = "4bit"
    default_lr = Lora.default_lr  # the same adapters as lora, over a 4-bit backbone

    def prepare(self, model):
        import peft

        if self.cfg.upcast_unquantized:
            # Casts norms/head to fp32 and enables input grads so LoRA in early layers learns.
            return peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.cfg.gradient_checkpointing
            )
        # The rest of that preparation, without the cast.
        for p in model.parameters():
            p.requires_grad = False
        if self.cfg.gradient_checkpointing:
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable()
        return model
