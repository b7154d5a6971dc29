// sdkgen writes the Python, Node.js and Go SDKs for a package schema with the
// code generators of github.com/pulumi/pulumi/pkg/v3 at the pinned CLI version.
//
// `pulumi package gen-sdk` does the same through the language hosts'
// GeneratePackage RPC, but the Python and Node.js hosts this project can build
// (sdk/v3 v3.79.0 and v3.68.0) predate that RPC and no Go host is available, so
// this program makes the calls those hosts make at v3.259.0:
//
//	files, err := codegen.GeneratePackage("pulumi-language-<lang>", pkg, ...)
//
// Usage: sdkgen SCHEMA.json OUT-DIR LANGUAGE...   (writes OUT-DIR/<language>/)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/blang/semver"
	gogen "github.com/pulumi/pulumi/pkg/v3/codegen/go"
	nodejsgen "github.com/pulumi/pulumi/pkg/v3/codegen/nodejs"
	pythongen "github.com/pulumi/pulumi/pkg/v3/codegen/python"
	"github.com/pulumi/pulumi/pkg/v3/codegen/schema"
)

// noLoader refuses every external package: the nixos schema references none.
type noLoader struct{}

func (noLoader) LoadPackage(pkg string, _ *semver.Version) (*schema.Package, error) {
	return nil, fmt.Errorf("sdkgen: schema references external package %q", pkg)
}

func (noLoader) LoadPackageV2(_ context.Context, d *schema.PackageDescriptor) (*schema.Package, error) {
	return nil, fmt.Errorf("sdkgen: schema references external package %q", d.Name)
}

func (noLoader) LoadPackageReference(pkg string, _ *semver.Version) (schema.PackageReference, error) {
	return nil, fmt.Errorf("sdkgen: schema references external package %q", pkg)
}

func (noLoader) LoadPackageReferenceV2(_ context.Context, d *schema.PackageDescriptor) (schema.PackageReference, error) {
	return nil, fmt.Errorf("sdkgen: schema references external package %q", d.Name)
}

// bind reads a schema the way the CLI and then the language host do: the CLI
// binds the file and sends the marshalled package, which the host binds again.
func bind(path string) (*schema.Package, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	loader := schema.NewCachedLoader(noLoader{})
	for i := 0; i < 2; i++ {
		var spec schema.PackageSpec
		if err := json.Unmarshal(data, &spec); err != nil {
			return nil, err
		}
		pkg, diags, err := schema.BindSpec(spec, loader, schema.ValidationOptions{AllowDanglingReferences: true})
		if err != nil {
			return nil, err
		}
		if diags.HasErrors() {
			return nil, diags
		}
		if i == 1 {
			return pkg, nil
		}
		if data, err = pkg.MarshalJSON(); err != nil {
			return nil, err
		}
	}
	panic("unreachable")
}

func generate(language string, pkg *schema.Package) (map[string][]byte, error) {
	switch language {
	case "python":
		return pythongen.GeneratePackage("pulumi-language-python", pkg, nil, schema.NewCachedLoader(noLoader{}))
	case "nodejs":
		return nodejsgen.GeneratePackage("pulumi-language-nodejs", pkg, nil, nil, false, schema.NewCachedLoader(noLoader{}))
	case "go":
		return gogen.GeneratePackage("pulumi-language-go", pkg, nil)
	}
	return nil, fmt.Errorf("sdkgen: unsupported language %q", language)
}

func run(schemaPath, out string, languages []string) error {
	for _, language := range languages {
		pkg, err := bind(schemaPath) // fresh per language: generators annotate the package
		if err != nil {
			return err
		}
		files, err := generate(language, pkg)
		if err != nil {
			return fmt.Errorf("%s: %w", language, err)
		}
		dir := filepath.Join(out, language)
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
		names := make([]string, 0, len(files))
		for name := range files {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			p := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(p, files[name], 0o644); err != nil {
				return err
			}
		}
		fmt.Fprintf(os.Stderr, "sdkgen: %s: %d files in %s\n", language, len(names), dir)
	}
	return nil
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: sdkgen SCHEMA.json OUT-DIR LANGUAGE...")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3:]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
