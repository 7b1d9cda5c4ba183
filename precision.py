"""Mixed precision: the autocast context of --precision, in training and evaluation alike."""
import torch


def autocast(device, precision):
    """Autocast for bf16 / fp16; a no-op context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=precision
                          != "fp32")
