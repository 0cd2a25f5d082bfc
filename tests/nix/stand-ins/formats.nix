# Stand-in for nixpkgs' pkgs.formats.toml (pkgs/pkgs-lib/formats.nix): the same value type
# (bool, int, float, str, path, attribute sets and lists of them; no null), and `generate` writing
# the TOML text to the store as nixpkgs' json2toml (remarshal) would, so the rendered file can be
# read back and run by the real daemons in the systemd suite.
{ lib }:
let
  inherit (lib) types;
  isTable = builtins.isAttrs;
  isArrayOfTables = v: builtins.isList v && v != [ ] && builtins.all builtins.isAttrs v;
  key = k: if builtins.match "[A-Za-z0-9_-]+" k != null then k else builtins.toJSON k;
  dotted = path: lib.concatMapStringsSep "." key path;
  # JSON string escapes (\" \\ \n \t \uXXXX) are valid TOML basic-string escapes.
  scalar =
    v:
    if builtins.isString v || builtins.isPath v then
      builtins.toJSON (toString v)
    else if builtins.isBool v then
      (if v then "true" else "false")
    else if builtins.isInt v || builtins.isFloat v then
      toString v
    else if builtins.isList v then
      "[ ${lib.concatMapStringsSep ", " scalar v} ]"
    else if builtins.isAttrs v then
      "{ ${lib.concatStringsSep ", " (lib.mapAttrsToList (k: x: "${key k} = ${scalar x}") v)} }"
    else
      throw "TOML has no representation for ${builtins.typeOf v}";
  table =
    path: attrs:
    let
      plain = lib.filterAttrs (_: v: !(isTable v) && !(isArrayOfTables v)) attrs;
      tables = lib.filterAttrs (_: isTable) attrs;
      arrays = lib.filterAttrs (_: isArrayOfTables) attrs;
    in
    lib.concatStrings (lib.mapAttrsToList (k: v: "${key k} = ${scalar v}\n") plain)
    + lib.concatStrings (lib.mapAttrsToList (k: v: "\n[${dotted (path ++ [ k ])}]\n" + table (path ++ [ k ]) v) tables)
    + lib.concatStrings (
      lib.mapAttrsToList (k: vs: lib.concatMapStrings (v: "\n[[${dotted (path ++ [ k ])}]]\n" + table (path ++ [ k ]) v) vs) arrays
    );
in
{
  toTOML = table [ ];

  toml =
    _:
    {
      type =
        let
          valueType =
            types.oneOf [
              types.bool
              types.int
              types.float
              types.str
              types.path
              (types.attrsOf valueType)
              (types.listOf valueType)
            ]
            // {
              description = "TOML value";
            };
        in
        valueType;
      generate = name: value: builtins.toFile name (table [ ] value);
    };

  # pkgs.formats.yaml (Grafana provisioning): same value type as JSON, null included.
  yaml =
    _:
    {
      type =
        let
          valueType =
            types.nullOr
              (
                types.oneOf [
                  types.bool
                  types.int
                  types.float
                  types.str
                  types.path
                  (types.attrsOf valueType)
                  (types.listOf valueType)
                ]
              )
            // {
              description = "YAML value";
            };
        in
        valueType;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
}
