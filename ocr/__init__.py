"""Pure text extraction from originals: bytes in, pages out. Imports nothing of ours."""
