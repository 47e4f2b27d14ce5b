"""ECHO's ops: each module holds an op's contract, its pure-torch reference and the dispatch to a fast
backend. The references are the truth every fast path is tested against."""
