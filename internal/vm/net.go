package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Network gives the guest a NIC on QEMU's user-mode network with
// restrict=on: the guest can reach nothing on the host or beyond except
// the forwarded addresses. Each connection to a Forward's guest address is
// carried to its host address by a stitch process QEMU starts for it
// (guestfwd's cmd: form, which unlike a chardev serves any number of
// connections, one after another or at once).
type Network struct {
	Forward []Forward
}

// Forward is one address the guest may connect to and where the host
// side connects.
type Forward struct {
	Guest string // IPv4 address and port in 10.0.2.0/24, e.g. "10.0.2.100:8440"
	Host  string // where the host connects, e.g. "127.0.0.1:38211"
}

// The user-mode network's fixed addresses.
const (
	guestIP     = "10.0.2.15"
	guestPrefix = 24
)

// ForwardCommand is the hidden stitch command QEMU runs per forwarded
// connection.
const ForwardCommand = "vm-forward"

func (n *Network) qemuArgs(stitch string) ([]string, error) {
	stitch, err := filepath.Abs(stitch)
	if err != nil {
		return nil, err
	}
	netdev := "user,id=net0,restrict=on"
	for _, f := range n.Forward {
		host, port, err := net.SplitHostPort(f.Guest)
		if err != nil || net.ParseIP(host).To4() == nil || !strings.HasPrefix(host, "10.0.2.") {
			return nil, fmt.Errorf("forward guest address %q: want IPv4:PORT in 10.0.2.0/24", f.Guest)
		}
		if _, _, err := net.SplitHostPort(f.Host); err != nil {
			return nil, fmt.Errorf("forward host address %q: %v", f.Host, err)
		}
		// QEMU splits its options at commas.
		if strings.ContainsAny(stitch+f.Host, ", ") {
			return nil, fmt.Errorf("forward: %q or %q contains a comma or space, which QEMU's option syntax cannot carry", stitch, f.Host)
		}
		netdev += fmt.Sprintf(",guestfwd=tcp:%s:%s-cmd:%s %s %s", host, port, stitch, ForwardCommand, f.Host)
	}
	return []string{"-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"}, nil
}

// ForwardMain is the host side of one forwarded connection: QEMU gives it
// the guest's stream on stdin and stdout, and it connects to addr.
func ForwardMain(ctx context.Context, addr string, in io.Reader, out io.Writer) error {
	var d net.Dialer
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	c, err := d.DialContext(ctx, "tcp", addr)
	cancel()
	if err != nil {
		return fmt.Errorf("forward to %s: %w", addr, err)
	}
	defer c.Close()
	done := make(chan error, 2)
	go func() {
		_, err := io.Copy(c, in)
		c.(*net.TCPConn).CloseWrite()
		done <- err
	}()
	go func() {
		_, err := io.Copy(out, c)
		done <- err
	}()
	// The connection ends when the host side closes; the guest's side
	// closing only half-closes it.
	err = <-done
	if err2 := <-done; err == nil {
		err = err2
	}
	return err
}

// guestNetUp loads the NIC's driver, then brings up lo and the NIC with
// the user-mode network's address.
func guestNetUp() error {
	if err := Modprobe("virtio_net"); err != nil {
		return err
	}
	if err := ifUp("lo", nil, 0); err != nil {
		return err
	}
	// The driver registers the interface as it probes the device.
	deadline := time.Now().Add(5 * time.Second)
	for {
		name, err := firstNIC()
		if err == nil {
			return ifUp(name, net.ParseIP(guestIP).To4(), guestPrefix)
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func firstNIC() (string, error) {
	entries, err := os.ReadDir("/sys/class/net")
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if e.Name() != "lo" {
			return e.Name(), nil
		}
	}
	return "", errors.New("no network interface appeared after loading virtio_net")
}

// LinkUp brings a network interface up, as a guest's workloads do with lo.
func LinkUp(name string) error { return ifUp(name, nil, 0) }

// ifUp sets an IPv4 address (if any) and brings the interface up.
func ifUp(name string, addr net.IP, prefix int) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	set := func(req uint, ip []byte) error {
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		if err := ifr.SetInet4Addr(ip); err != nil {
			return err
		}
		return unix.IoctlIfreq(fd, req, ifr)
	}
	if addr != nil {
		if err := set(unix.SIOCSIFADDR, addr); err != nil {
			return fmt.Errorf("%s: set address: %w", name, err)
		}
		if err := set(unix.SIOCSIFNETMASK, net.CIDRMask(prefix, 32)); err != nil {
			return fmt.Errorf("%s: set netmask: %w", name, err)
		}
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s: bring up: %w", name, err)
	}
	return nil
}
