"""The io wing: atomic files and ledgers, typed reading of untrusted fields, images in and out."""
