"""Data: Fashion-MNIST with class captions, and image folders with captions.jsonl."""
from e2ediff.data.fashion_mnist import (CAPTION_TEMPLATES, CLASS_NAMES, CLASS_NOUNS, NUM_CLASSES, FashionMNISTText,
                                        caption, caption_index, class_captions, default_prompts, find_fashion_mnist,
                                        from_model_images, load_fashion_mnist, read_idx, to_model_images,
                                        train_val_split)
from e2ediff.data.folder import ImageFolderText

__all__ = ["CAPTION_TEMPLATES", "CLASS_NAMES", "CLASS_NOUNS", "NUM_CLASSES", "FashionMNISTText", "ImageFolderText",
           "caption", "caption_index", "class_captions", "default_prompts", "find_fashion_mnist",
           "from_model_images", "load_fashion_mnist", "read_idx", "to_model_images", "train_val_split"]
