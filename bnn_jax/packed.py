"""The packed 1-bit network, as one import: `from bnn_jax import packed`.

Its parts live in `bnn_jax.deploy`: `packed_format` (constants, bits, the
file's reader and writer; numpy only), `packing` (a trained model's
variables to the format) and `packed_forward` (the XNOR-popcount forward,
`packed_conv`, `PackedModel`). Evaluation over a data set is the shared
loop's (`bnn_jax.training.evaluation.evaluate_packed`).
"""

from bnn_jax.deploy.packed_format import (  # noqa: F401
    FORMAT, FORMAT_VERSION, HEADER_KEY, PACKED, SIGN_ZERO_VALUES, WORD_BITS,
    ZERO_WEIGHTS_TO, PackedFormatError, check_input_matches, flatten,
    num_words, read, read_flat, unflatten, unpack_bits, unpack_kernel,
    variables_bytes, write)
from bnn_jax.deploy.packed_forward import (  # noqa: F401
    PackedModel, binarize_activations, is_packed_conv, load, model_overrides,
    pack_bits, packed_conv)
from bnn_jax.deploy.packing import (  # noqa: F401
    LayerInfo, PackResult, binary_weight_scale, fold_batch_norm,
    nudge_zero_weights, pack_variables, trace_layers)
