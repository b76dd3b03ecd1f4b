"""Which AMI to launch: the latest public image of the distribution, from its SSM parameter.

AWS (and Canonical) publish the current image ids as public SSM parameters in every region,
so the launcher needs no table of AMI ids of its own. The GPU images are the AWS Deep
Learning Base AMIs (OSS NVIDIA driver, docker and the NVIDIA container toolkit included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from botocore.exceptions import ClientError

from xdrive.cloudinit.render import Distro
from xdrive.ec2 import InstanceTypeInfo, aws_errors
from xdrive.errors import ConfigError

Architecture = Literal["x86_64", "arm64"]

_PARAMETERS: dict[tuple[Distro, bool], str] = {
    ("al2023", False): "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}",
    ("al2023", True): (
        "/aws/service/deeplearning/ami/{arch}/"
        "base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id"
    ),
    ("ubuntu", False): (
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/{deb_arch}/hvm/ebs-gp3/ami-id"
    ),
    ("ubuntu", True): (
        "/aws/service/deeplearning/ami/{arch}/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    ),
}
_DEBIAN_ARCH: dict[Architecture, str] = {"x86_64": "amd64", "arm64": "arm64"}


@dataclass(frozen=True)
class ImageChoice:
    image_id: str
    source: str  # "ssm:<parameter>" or "--ami"
    architecture: Architecture
    gpu: bool


def architecture_of(instance_type: InstanceTypeInfo) -> Architecture:
    if "x86_64" in instance_type.architectures:
        return "x86_64"
    if "arm64" in instance_type.architectures:
        return "arm64"
    raise ConfigError(
        f"instance type {instance_type.name} runs {', '.join(instance_type.architectures)}, "
        "which xdrive has no image for",
        "choose an x86_64 or arm64 instance type, or pass --ami",
    )


def image_parameter(distro: Distro, architecture: Architecture, gpu: bool) -> str:
    """The public SSM parameter naming the latest image of this kind."""
    return _PARAMETERS[(distro, gpu)].format(arch=architecture, deb_arch=_DEBIAN_ARCH[architecture])


def wants_gpu_image(instance_type: InstanceTypeInfo, gpu: Optional[bool]) -> bool:
    """``gpu`` None: the GPU image exactly when the instance type has GPUs."""
    if gpu is None:
        return instance_type.gpus > 0
    if gpu and instance_type.gpus == 0:
        raise ConfigError(
            f"instance type {instance_type.name} has no GPU, but --gpu asks for the GPU image",
            "choose a GPU instance type (for example g5.xlarge) or drop --gpu",
        )
    return gpu


def resolve_image(
    ssm: Any,
    distro: Distro,
    instance_type: InstanceTypeInfo,
    gpu: Optional[bool],
    ami: Optional[str] = None,
) -> ImageChoice:
    """``ami`` as given, else the latest image from the distribution's SSM parameter."""
    architecture = architecture_of(instance_type)
    use_gpu = wants_gpu_image(instance_type, gpu)
    if ami:
        if not ami.startswith("ami-"):
            raise ConfigError(f"{ami!r} is not an AMI id", "pass --ami ami-0123456789abcdef0")
        return ImageChoice(ami, "--ami", architecture, use_gpu)
    name = image_parameter(distro, architecture, use_gpu)
    with aws_errors("ssm:GetParameter"):
        try:
            answer = ssm.get_parameter(Name=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "ParameterNotFound":
                raise ConfigError(
                    f"the region has no public image parameter {name}",
                    "pass --ami ami-... (an image of the distribution given by --distro)",
                ) from None
            raise
    return ImageChoice(str(answer["Parameter"]["Value"]), f"ssm:{name}", architecture, use_gpu)
