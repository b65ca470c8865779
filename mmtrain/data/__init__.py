"""Data: conversation files and the synthetic set -> tokenised samples -> padded batches.

``formats`` reads and checks files, ``template`` renders and tokenises conversations,
``dataset`` is the torch Dataset, ``build`` turns the data flags into train/eval
datasets, ``collator`` makes batches, ``synthetic`` writes the default dataset.
"""

from mmtrain.data.build import DataBundle, Sources, build_datasets, read_sources, register_dataset
from mmtrain.data.collator import BATCH_KEYS, BatchCollator, Collator
from mmtrain.data.dataset import ConversationDataset
from mmtrain.data.formats import DataError, load_records
from mmtrain.data.template import IGNORE_INDEX, EncodedConversation, encode_conversation

__all__ = [
    "BATCH_KEYS",
    "BatchCollator",
    "Collator",
    "ConversationDataset",
    "DataBundle",
    "DataError",
    "EncodedConversation",
    "IGNORE_INDEX",
    "build_datasets",
    "read_sources",
    "Sources",
    "encode_conversation",
    "load_records",
    "register_dataset",
]
