"""Pure pieces with no knowledge of files or graphs: the fold maths and the one output comparator."""
