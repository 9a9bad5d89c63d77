// Command boltcheck is a test helper for crifs: it uses the real bbolt library to dump,
// check, create and mutate bolt files, so the Python reader and writer can be compared
// against bbolt itself.
//
// Build offline on Debian (golang-go + golang-github-coreos-bbolt-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o boltcheck .
//
// Usage:
//
//	boltcheck dump FILE...                        JSON list: page size, txid, Check errors, tree
//	boltcheck gen FILE SEED PAGESIZE NOSYNC OPS   new DB, OPS random ops in several transactions
//	boltcheck mutate FILE SEED OPS                random ops on an existing DB
//	boltcheck gotime UNIXSEC NSEC ZONESEC         hex of time.MarshalBinary (ZONESEC "utc" = UTC)
//	boltcheck varint N                            hex of binary.PutVarint and PutUvarint(|N|)
package main

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"
)

type entry struct {
	Key    string  `json:"k"`
	Value  *string `json:"v,omitempty"`
	Bucket *bucket `json:"b,omitempty"`
}

type bucket struct {
	Sequence uint64  `json:"seq"`
	Items    []entry `json:"items"`
}

type dump struct {
	File     string   `json:"file"`
	PageSize int      `json:"page_size"`
	TxID     int      `json:"txid"`
	Check    []string `json:"check"`
	Root     bucket   `json:"root"`
}

// bucketOf dumps the entries visible through cursor c; sub(k) opens a sub-bucket or is nil.
func bucketOf(c *bolt.Cursor, sub func(k []byte) *bolt.Bucket) []entry {
	items := []entry{}
	for k, v := c.First(); k != nil; k, v = c.Next() {
		e := entry{Key: hex.EncodeToString(k)}
		if b := sub(k); v == nil && b != nil {
			e.Bucket = &bucket{Sequence: b.Sequence(), Items: bucketOf(b.Cursor(), b.Bucket)}
		} else {
			s := hex.EncodeToString(v)
			e.Value = &s
		}
		items = append(items, e)
	}
	return items
}

func dumpFile(path string) (dump, error) {
	d := dump{File: path, Check: []string{}}
	db, err := bolt.Open(path, 0600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return d, err
	}
	defer db.Close()
	d.PageSize = db.Info().PageSize
	err = db.View(func(tx *bolt.Tx) error {
		d.TxID = tx.ID()
		for e := range tx.Check() {
			d.Check = append(d.Check, e.Error())
		}
		d.Root = bucket{Items: bucketOf(tx.Cursor(), tx.Bucket)}
		return nil
	})
	return d, err
}

func randomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	r.Read(b)
	return b
}

func randomKey(r *rand.Rand) []byte {
	switch r.Intn(4) {
	case 0:
		return []byte(fmt.Sprintf("key-%06d", r.Intn(100000)))
	case 1:
		return randomBytes(r, 1+r.Intn(40))
	default:
		return []byte(fmt.Sprintf("k%d", r.Intn(500)))
	}
}

func randomValue(r *rand.Rand) []byte {
	switch r.Intn(10) {
	case 0:
		return []byte{}
	case 1:
		return randomBytes(r, 4096+r.Intn(20000)) // needs overflow pages
	default:
		return randomBytes(r, r.Intn(200))
	}
}

// pickBucket walks down from the root to a random bucket, possibly creating one.
func pickBucket(r *rand.Rand, tx *bolt.Tx) (*bolt.Bucket, error) {
	names := [][]byte{[]byte("v1"), []byte("alpha"), []byte("big"), []byte("z")}
	b, err := tx.CreateBucketIfNotExists(names[r.Intn(len(names))])
	if err != nil {
		return nil, err
	}
	for depth := 0; depth < 4 && r.Intn(3) != 0; depth++ {
		var subs [][]byte
		_ = b.ForEach(func(k, v []byte) error {
			if v == nil {
				subs = append(subs, append([]byte(nil), k...))
			}
			return nil
		})
		if len(subs) == 0 || r.Intn(4) == 0 {
			nb, err := b.CreateBucketIfNotExists(randomKey(r))
			if err != nil {
				return b, nil // the key holds a value; stay here
			}
			b = nb
			continue
		}
		b = b.Bucket(subs[r.Intn(len(subs))])
	}
	return b, nil
}

func randomOp(r *rand.Rand, tx *bolt.Tx) error {
	b, err := pickBucket(r, tx)
	if err != nil {
		return err
	}
	switch op := r.Intn(20); {
	case op < 10:
		if err := b.Put(randomKey(r), randomValue(r)); err != nil && err != bolt.ErrIncompatibleValue {
			return err
		}
	case op < 13: // delete a random existing key or bucket
		c := b.Cursor()
		k, v := c.First()
		for skip := r.Intn(20); skip > 0 && k != nil; skip-- {
			k, v = c.Next()
		}
		if k == nil {
			return nil
		}
		if v == nil && b.Bucket(k) != nil {
			return b.DeleteBucket(k)
		}
		return c.Delete()
	case op < 15:
		_, err := b.NextSequence()
		return err
	case op < 16:
		return b.SetSequence(uint64(r.Int63()))
	case op < 17: // many keys at once: branch pages
		for i := 0; i < 300+r.Intn(1500); i++ {
			v := randomBytes(r, r.Intn(100))
			if err := b.Put([]byte(fmt.Sprintf("bulk-%07d", r.Intn(1000000))), v); err != nil && err != bolt.ErrIncompatibleValue {
				return err
			}
		}
	default:
		_, err := b.CreateBucketIfNotExists(randomKey(r))
		if err != nil && err != bolt.ErrIncompatibleValue {
			return err
		}
	}
	return nil
}

func mutate(db *bolt.DB, seed int64, ops int) error {
	r := rand.New(rand.NewSource(seed))
	for done := 0; done < ops; {
		batch := 1 + r.Intn(20)
		err := db.Update(func(tx *bolt.Tx) error {
			for i := 0; i < batch && done+i < ops; i++ {
				if err := randomOp(r, tx); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		done += batch
	}
	return nil
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		fail(err)
	}
	return n
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "boltcheck:", err)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 3 {
		fail(fmt.Errorf("usage: boltcheck dump|gen|mutate FILE ..."))
	}
	switch os.Args[1] {
	case "dump":
		var out []dump
		for _, path := range os.Args[2:] {
			d, err := dumpFile(path)
			if err != nil {
				fail(fmt.Errorf("%s: %w", path, err))
			}
			out = append(out, d)
		}
		if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
			fail(err)
		}
	case "gen":
		if len(os.Args) != 7 {
			fail(fmt.Errorf("usage: boltcheck gen FILE SEED PAGESIZE NOSYNC OPS"))
		}
		opts := &bolt.Options{PageSize: atoi(os.Args[4]), NoFreelistSync: os.Args[5] == "1", Timeout: time.Second}
		db, err := bolt.Open(os.Args[2], 0600, opts)
		if err != nil {
			fail(err)
		}
		if err := mutate(db, int64(atoi(os.Args[3])), atoi(os.Args[6])); err != nil {
			fail(err)
		}
		if err := db.Close(); err != nil {
			fail(err)
		}
	case "mutate":
		if len(os.Args) != 5 {
			fail(fmt.Errorf("usage: boltcheck mutate FILE SEED OPS"))
		}
		db, err := bolt.Open(os.Args[2], 0600, &bolt.Options{Timeout: time.Second})
		if err != nil {
			fail(err)
		}
		if err := mutate(db, int64(atoi(os.Args[3])), atoi(os.Args[4])); err != nil {
			fail(err)
		}
		if err := db.Close(); err != nil {
			fail(err)
		}
	case "gotime":
		sec, err := strconv.ParseInt(os.Args[2], 10, 64)
		if err != nil {
			fail(err)
		}
		t := time.Unix(sec, int64(atoi(os.Args[3]))).UTC()
		if os.Args[4] != "utc" {
			t = t.In(time.FixedZone("x", atoi(os.Args[4])))
		}
		b, err := t.MarshalBinary()
		if err != nil {
			fail(err)
		}
		fmt.Println(hex.EncodeToString(b))
	case "varint":
		n, err := strconv.ParseInt(os.Args[2], 10, 64)
		if err != nil {
			fail(err)
		}
		buf := make([]byte, binary.MaxVarintLen64)
		u := uint64(n)
		if n < 0 {
			u = uint64(-n)
		}
		fmt.Println(hex.EncodeToString(buf[:binary.PutVarint(buf, n)]), hex.EncodeToString(buf[:binary.PutUvarint(buf, u)]))
	default:
		fail(fmt.Errorf("unknown command %q", os.Args[1]))
	}
}
