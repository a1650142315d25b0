"""Stand-in GPUs for the CPU: torch.cuda's answers faked, and `nn.Module.to` recorded, so a test
checks where each stage sends its model without a device."""

import torch


def stand_in_gpus(monkeypatch, names: list[str], bf16: bool = True) -> None:
    """This machine, as torch.cuda answers, has GPUs with these names (with bf16 or not)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(names))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))

    def name(device=None) -> str:
        return names[torch.device(device or "cuda").index or 0]

    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def record_module_moves(monkeypatch) -> list[torch.device]:
    """Intercept `nn.Module.to`: the list gets every device a model is sent to; one sent to a
    (stand-in) GPU stays on the CPU, where everything that follows the model's parameters
    (batches, caches) then runs."""
    moves: list[torch.device] = []
    original = torch.nn.Module.to

    def to(module, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            moves.append(device)
        return original(module, None if device is None or device.type == "cuda" else device, dtype, non_blocking)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return moves
