"""2-D object detection on MONAI's RetinaNet (torchvision-free parts, network, engines, fusion)."""
