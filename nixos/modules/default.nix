# All ZTNA modules; each daemon is enabled on its own.
{
  imports = [
    ./intermediate.nix
    ./connector.nix
    ./agent.nix
    ../monitoring/default.nix
  ];
}
