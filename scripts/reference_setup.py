"""What the PyTorch reference's main() does to its model and to torch before
training, for the probe scripts that build the reference's model themselves
(first_step_probe, first_step_gpu, forward_parity_probe, grad_noise_probe,
reference_dtype_probe). `R` is the imported train_gpt module."""

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")


def cast_as_main(R, model):
    """bf16, then the banks and every CastedLinear back to float32 and the
    low-dimensional (control) parameters to float32, as main() leaves them."""
    model = model.bfloat16()
    for name in BANKS:
        getattr(model, name).data = getattr(model, name).data.float()
    for module in model.modules():
        if isinstance(module, R.CastedLinear):
            module.float()
    R.restore_low_dim_params_to_fp32(model)
    return model


def set_backends(torch):
    """TF32 and flash attention only, as main() sets them on a GPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
