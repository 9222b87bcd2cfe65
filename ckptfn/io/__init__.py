"""Effects on storage: the only code that touches files.

Every file-system call goes through one seam (``ckptfn.io.fs.FileSystem``);
files and directory trees are published by one protocol (``ckptfn.io.publish``).
"""
