"""Data sets for fine-tuning: processing, concatenation, collate functions and samplers.

Each name is imported on first use (:mod:`xtuner._lazy`), so ``xtuner.dataset.map_fns``
imports neither ``datasets`` nor ``torch``: add a name with one line below.
"""

from xtuner._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "process_hf_dataset": ".huggingface",
        "process_ms_dataset": ".modelscope",
        "ConcatDataset": ".concat_dataset",
        "LLaVADataset": ".llava",
        "InternVL_V1_5_Dataset": ".internvl_dataset",
        "MOSSSFTDataset": ".moss_sft",
        "build_packed_dataset": ".intern_repo",
        "load_intern_repo_tokenized_dataset": ".intern_repo",
        "load_intern_repo_untokenized_dataset": ".intern_repo",
        "RefCOCOJsonDataset": ".refcoco_json",
        "RefCOCOJsonEvalDataset": ".refcoco_json",
        "InvRefCOCOJsonDataset": ".refcoco_json",
        "expand2square": ".llava",
        "encode_fn": ".utils",
    },
)
