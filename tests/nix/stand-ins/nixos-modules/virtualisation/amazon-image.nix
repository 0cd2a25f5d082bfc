# Stand-in for nixpkgs' nixos/modules/virtualisation/amazon-image.nix (imported by deploy/common.nix
# via modulesPath): the EC2 image settings it makes are NixOS' own and set none of the options the
# checks look at, so it contributes nothing here.
_: { }
