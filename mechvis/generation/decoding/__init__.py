"""CPU fast paths for decoding, behind a switch: the model HF's generate runs (`decoder`), the halves
product and grouped-query attention (`kernels`) and lean single-token steps (`lean`)."""
