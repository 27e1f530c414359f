#!/usr/bin/env bash
# Validates the CloudFormation template offline: cfn-lint (resource schemas, intrinsic functions,
# conditions, IAM policy syntax) must report nothing, warnings included. Installs cfn-lint from
# PyPI when it is missing. Needs no AWS account or credentials.
#
#   deploy/aws/validate.sh
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v cfn-lint >/dev/null 2>&1; then
    echo "installing: cfn-lint (pip)" >&2
    python3 -m pip install --quiet --disable-pip-version-check cfn-lint
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
command -v cfn-lint >/dev/null 2>&1 || { echo "cfn-lint is not on PATH after installing it" >&2; exit 1; }

cfn-lint titus.yaml
echo "aws template: valid"
