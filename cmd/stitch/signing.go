package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/modsign"
)

// runKeysSigning: stitch keys signing init|rotate|use KEYID|retire KEYID|list.
func runKeysSigning(ctx context.Context, st *stdio, args []string) error {
	return runGroup(ctx, st, "keys signing", []subcommand{
		{name: "init", summary: "create the first module-signing key: every bundle published from then on is signed", run: func(ctx context.Context, st *stdio, args []string) error {
			return runKeysSigningAdd(st, "init", args)
		}},
		{name: "rotate", summary: "create a new module-signing key next to the current one", run: func(ctx context.Context, st *stdio, args []string) error {
			return runKeysSigningAdd(st, "rotate", args)
		}},
		{name: "use", args: "KEYID", summary: "sign with another key from now on", run: runKeysSigningUse},
		{name: "retire", args: "KEYID", summary: "stop publishing a key's certificate", run: runKeysSigningRetire},
		{name: "list", summary: "the module-signing keys", run: runKeysSigningList},
	}, args)
}

func runKeysSigningAdd(st *stdio, sub string, args []string) error {
	c := newRepoCmd(st, "keys signing "+sub, "", "Creates a module-signing key and publishes its certificate (signing/KEYID.der) as a signed target.")
	alg := c.fs.String("algorithm", modsign.RSA, "key algorithm, rsa (RSA-4096, what every Debian kernel verifies) or ecdsa (P-384: Debian's 6.12 kernels only, 6.1 has no ECDSA)")
	subject := c.fs.String("subject", bundle.DefaultSigningSubject, "the certificate's common name (what /proc/keys shows)")
	valid := c.fs.Duration("valid", bundle.DefaultSigningValid, "how long the certificate is valid")
	r, err := c.repo(args, 0)
	if err != nil {
		return err
	}
	if *alg != modsign.RSA && *alg != modsign.ECDSA {
		return usageError{fmt.Errorf("--algorithm %q, want rsa or ecdsa", *alg)}
	}
	if *valid < 24*time.Hour {
		return usageError{fmt.Errorf("--valid %s: want at least a day", *valid)}
	}
	add := r.InitSigning
	if sub == "rotate" {
		add = r.RotateSigning
	}
	k, err := add(*alg, *subject, *valid)
	if err != nil {
		return err
	}
	if *alg == modsign.ECDSA {
		fmt.Fprintf(st.err, "note: Debian's 6.1 kernels cannot verify ECDSA module signatures (no CONFIG_CRYPTO_ECDSA): they refuse modules signed with this key\n")
	}
	if *c.json {
		return printJSON(st.out, k)
	}
	fmt.Fprintf(st.out, "module-signing key %s (%s) created in %s\ncertificate: %s (published as %s)\n", k.KeyID, k.Description, *c.dir, k.Cert, k.Target)
	if sub == "init" {
		fmt.Fprintf(st.out, "every bundle published from now on is signed with it; enroll the certificate on each Secure Boot machine (see docs/signing.md)\n")
	} else {
		fmt.Fprintf(st.out, "the current key still signs: enroll this certificate on every machine, then `stitch keys signing use %s --dir %s`\n", k.KeyID, *c.dir)
	}
	return nil
}

func runKeysSigningUse(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "keys signing use", "KEYID", "Signs the bundles published from now on with KEYID (see `stitch keys signing list`); bundles already published keep their signatures.")
	r, err := c.repo(args, 1)
	if err != nil {
		return err
	}
	k, err := r.UseSigning(c.fs.Arg(0))
	if err != nil {
		return err
	}
	return report(st, *c.json, k, "%s (%s) signs the bundles published from now on; bundles already published keep their signatures\n", k.KeyID, k.Description)
}

func runKeysSigningRetire(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "keys signing retire", "KEYID", "Unpublishes KEYID's certificate: agents refuse what it signs. Refused while published bundles are signed by it, unless --force.")
	force := c.fs.Bool("force", false, "even though published bundles are signed by the key (agents will refuse them)")
	r, err := c.repo(args, 1)
	if err != nil {
		return err
	}
	keyID := c.fs.Arg(0)
	still, err := r.RetireSigning(keyID, *force)
	if err != nil {
		return err
	}
	if still == nil {
		still = []string{}
	}
	return report(st, *c.json, map[string]any{"key_id": keyID, "still_signed": still},
		"%s retired: its certificate is no longer published, agents refuse what it signs (%d published bundle(s) signed by it)\n", keyID, len(still))
}

func runKeysSigningList(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "keys signing list", "", "Lists the module-signing keys: which signs, which are published, and the name the kernel gives each (/proc/keys).")
	r, err := c.repo(args, 0)
	if err != nil {
		return err
	}
	ks, err := r.SigningKeys()
	if err != nil {
		return err
	}
	if *c.json {
		if ks == nil {
			ks = []bundle.SigningKey{}
		}
		return printJSON(st.out, map[string]any{"keys": ks})
	}
	if len(ks) == 0 {
		fmt.Fprintf(st.out, "no module-signing key in %s: modules are published unsigned (`stitch keys signing init` creates one)\n", *c.dir)
		return nil
	}
	tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY ID\tALGORITHM\tEXPIRES\tSIGNS\tPUBLISHED\tKERNEL KEY DESCRIPTION")
	for _, k := range ks {
		signs, pub := "", "retired"
		if k.Current {
			signs = "yes"
		}
		if k.Target != "" {
			pub = k.Target
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", k.KeyID, k.Algorithm, k.NotAfter.Format("2006-01-02"), signs, pub, k.Description)
	}
	return tw.Flush()
}
