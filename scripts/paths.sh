# Sourced by the shell recipes before their cd: paths given relative are relative to where the script was
# started, so they are made absolute here.

absolute() {  # absolute NAME...: each named variable's path made absolute
    local name
    for name in "$@"; do
        [[ ${!name} = /* ]] || printf -v "$name" '%s' "$PWD/${!name}"
    done
}

PYTHON=${PYTHON:-python}
[[ $PYTHON != */* ]] || absolute PYTHON  # a path; a bare name is a command looked up in PATH
