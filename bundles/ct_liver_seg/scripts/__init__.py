"""Python code of the ct_liver_seg bundle, importable as ``scripts`` with the bundle root on the path
(MONAI's bundle runner and MONAI Label put it there)."""
