import Foundation
import Testing
import TestSupport

/// The corrupt-image corpus: valid images made by QEMU, each damaged at one
/// named spec field (qcow2.rst), run through every read-only command and
/// `flatten` with the built binary. Every command must end with its documented
/// exit status, at most one `qbackup: error:` line that names the structure's
/// region and offset, quickly, within bounded memory, and leave the input
/// byte-identical. One test case per damaged field, named after it.
@Suite struct CorruptCorpusTests {
    /// The pristine images a case starts from, made once by QEMU's tools.
    enum Base: String, Sendable {
        /// v3, 4 KiB clusters: data, a zero cluster, compressed clusters, a snapshot,
        /// two bitmaps (one disabled) with dirty ranges, and a qcow2 backing file.
        case v3
        /// v2 (compat 0.10), 512-byte clusters, with a snapshot.
        case v2
        /// v3 with extended L2 entries (16 KiB clusters, 512-byte subclusters).
        case extendedL2
    }

    struct Damage: CustomTestStringConvertible, Sendable {
        var name: String
        var base: Base
        /// The error line names the region and `at offset 0x`; false where the failure is about
        /// another file (a backing file name that leads nowhere) rather than a place in this one.
        var namesOffset = true
        var apply: @Sendable (CorruptImageLayout) throws -> Void
        var testDescription: String { name }
    }

    // MARK: - Base images

    struct Bases: Sendable {
        let dir: TempDir
        func folder(_ base: Base) -> String { dir.file(base.rawValue) }
    }

    /// Made once per test process; each case copies its base folder.
    static let bases: Result<Bases, Error> = Result {
        let dir = TempDir("qbackup-corrupt-bases")
        let fm = FileManager.default
        for base in [Base.v3, .v2, .extendedL2] { try fm.createDirectory(atPath: dir.file(base.rawValue), withIntermediateDirectories: true) }

        let v3 = dir.file("v3")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "\(v3)/backing.qcow2", "1M")
        try Tools.qemuIO("\(v3)/backing.qcow2", format: "qcow2", ["write -P 0x0b 0 1M"])
        let image = "\(v3)/image.qcow2"
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "backing.qcow2", "-F", "qcow2",
                          image, "1M")
        try Tools.qemuIO(image, format: "qcow2", ["write -P 0x11 0 16k", "write -z 16k 4k", "write -c -P 0x22 32k 4k",
                                                  "write -c -P 0x33 36k 4k"])
        try Tools.qemuImg("snapshot", "-c", "snap1", image)
        try Tools.qemuImg("bitmap", "--add", image, "b0")
        try Tools.qemuImg("bitmap", "--add", "-g", "65536", image, "b1")
        try Tools.qemuIO(image, format: "qcow2", ["write -P 0x44 8k 8k", "write -P 0x55 512k 4k"])
        try Tools.qemuImg("bitmap", "--disable", image, "b1")

        let v2 = "\(dir.file("v2"))/image.qcow2"
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", v2, "256k")
        try Tools.qemuIO(v2, format: "qcow2", ["write -P 0x66 0 4k", "write -P 0x67 100k 1k"])
        try Tools.qemuImg("snapshot", "-c", "old", v2)
        try Tools.qemuIO(v2, format: "qcow2", ["write -P 0x68 1k 1k"])

        let ext = "\(dir.file("extendedL2"))/image.qcow2"
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=16384,extended_l2=on", ext, "1M")
        try Tools.qemuIO(ext, format: "qcow2", ["write -P 0x77 0 1k", "write -z 2k 512", "write -P 0x78 20k 2k"])
        return Bases(dir: dir)
    }

    // MARK: - The damaged fields

    /// Header fields of qcow2.rst "Header", in spec order: name, byte offset, width.
    static let headerFields: [(String, UInt64, Int)] = [
        ("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4),
        ("cluster_bits", 20, 4), ("size", 24, 8), ("crypt_method", 32, 4), ("l1_size", 36, 4),
        ("l1_table_offset", 40, 8), ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
        ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8),
        ("compatible_features", 80, 8), ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
        ("header_length", 100, 4), ("compression_type", 104, 1),
    ]

    /// Each header field set to zero, all ones, its top bit alone, and its value plus one.
    static var headerDamages: [Damage] {
        var out: [Damage] = []
        for (field, offset, width) in headerFields {
            let bases: [Base] = offset < 72 ? [.v3, .v2] : [.v3]
            for base in bases {
                let values: [(String, @Sendable (UInt64) -> UInt64)] = [
                    ("0", { _ in 0 }), ("all ones", { _ in UInt64.max }),
                    ("top bit", { _ in UInt64(1) << UInt64(width * 8 - 1) }), ("+1", { $0 &+ 1 }),
                ]
                for (label, value) in values {
                    // A damaged backing name field leads to another file name, which the error names instead.
                    let namesOffset = !(field.hasPrefix("backing_file") && base == .v3)
                    out.append(Damage(name: "\(base.rawValue) header \(field) (0x\(String(offset, radix: 16))) = \(label)", base: base,
                                      namesOffset: namesOffset) {
                        layout in
                        let old = try peek(layout.path, at: offset, count: width).reduce(0) { $0 << 8 | UInt64($1) }
                        try poke(layout.path, at: offset, Array(be(value(old)).suffix(width)))
                    })
                }
            }
        }
        return out
    }

    /// A real `backup` (not --dry-run) of a damaged image: it may succeed (and then
    /// changes the image: it adds its bitmap), but when it fails the image is untouched.
    @Test(arguments: damages.filter { $0.base == .v3 }.enumerated().filter { $0.offset % 4 == 0 }.map(\.element))
    func failedBackupLeavesImageUntouched(_ damage: Damage) throws {
        let bases = try Self.bases.get()
        let dir = TempDir("qbackup-corrupt-backup")
        let folder = bases.folder(damage.base)
        for name in try FileManager.default.contentsOfDirectory(atPath: folder) {
            try FileManager.default.copyItem(atPath: "\(folder)/\(name)", toPath: dir.file(name))
        }
        let image = dir.file("image.qcow2")
        try damage.apply(try CorruptImageLayout(image))
        let damaged = try Data.contents(of: image)
        let result = try Bounded.run([try QBackupBinary.path(), "backup", image, "--repo", dir.file("repo")], mebibytes: 1024, seconds: 20)
        #expect([0, 1].contains(result.status), "\(damage.name): backup exit \(result.status): \(result.stderr)")
        if result.status != 0 {
            let lines = result.stderr.split(separator: "\n")
            #expect(lines.count == 1 && lines[0].hasPrefix("qbackup: error: "), "\(damage.name): \(result.stderr)")
            #expect(try Data.contents(of: image) == damaged, "\(damage.name): a failed backup changed the image")
        }
        print("corrupt corpus backup: \(damage.name): backup=\(result.status)")
    }

    /// Every command that writes an image, on each damaged field: where `check` finds the
    /// damage (exit 1 or 2), each refuses with one error line and leaves the image and its
    /// backing file byte-identical (DESIGN "Damaged images"); where it finds none, a
    /// command may succeed, and one that fails still writes nothing.
    /// `verify REPO --image IMAGE` is read-only on the image too: backed up while intact, then
    /// damaged, the image is compared with the chain and the run ends with a status verify
    /// allows — 0 with the one damage warning when check finds the metadata damaged, or 1 with
    /// one error line or a listed problem — and neither the image nor the repository changes.
    @Test(arguments: damages.filter { $0.base != .v2 })
    func verifyImageWarnsOfDamage(_ damage: Damage) throws {
        let bases = try Self.bases.get()
        let dir = TempDir("qbackup-corrupt-verify")
        let folder = bases.folder(damage.base)
        for name in try FileManager.default.contentsOfDirectory(atPath: folder) {
            try FileManager.default.copyItem(atPath: "\(folder)/\(name)", toPath: dir.file(name))
        }
        let image = dir.file("image.qcow2"), repo = dir.file("repo")
        let binary = try QBackupBinary.path()
        let backup = try Bounded.run([binary, "backup", image, "--repo", repo, "--quiet"], mebibytes: 1024, seconds: 20)
        try #require(backup.status == 0, "\(damage.name): backup of the intact image: \(backup.stderr)")
        try damage.apply(try CorruptImageLayout(image))
        let damaged = try Data.contents(of: image)
        let manifest = try Data.contents(of: "\(repo)/manifest.json")
        let check = try Bounded.run([binary, "check", image], mebibytes: 1024, seconds: 10)
        let damagedMetadata = check.status == 2 || (check.status == 1 && !check.stderr.contains("not a qcow2"))
        let result = try Bounded.run([binary, "verify", repo, "--image", image], mebibytes: 1024, seconds: 10)
        let lines = result.stderr.split(separator: "\n")
        let errors = lines.filter { $0.hasPrefix("qbackup: error:") }
        #expect([0, 1].contains(result.status), "\(damage.name): verify exit \(result.status): \(result.stderr)")
        if result.status == 0, damagedMetadata {
            let warnings = lines.filter { $0.hasPrefix("qbackup: warning: ") && $0.hasSuffix("; run 'qbackup check'") }
            #expect(warnings.count == 1, "\(damage.name): check exits \(check.status), want one damage warning: \(result.stderr)")
            #expect(warnings.allSatisfy { $0.contains(dir.path) }, "\(damage.name): the warning names no file: \(result.stderr)")
        }
        if result.status == 1 {
            #expect(errors.count == 1 || (errors.isEmpty && !result.stdout.isEmpty), "\(damage.name): \(result.stdout)\(result.stderr)")
        } else {
            #expect(errors.isEmpty, "\(damage.name): exit 0 with an error line: \(result.stderr)")
        }
        #expect(try Data.contents(of: image) == damaged, "\(damage.name): verify changed the image")
        #expect(try Data.contents(of: "\(repo)/manifest.json") == manifest, "\(damage.name): verify changed the manifest")
        print("corrupt corpus verify: \(damage.name): check=\(check.status) verify=\(result.status)")
    }

    @Test(arguments: damages)
    func writingCommandsRefuseDamage(_ damage: Damage) throws {
        let bases = try Self.bases.get()
        let dir = TempDir("qbackup-corrupt-write")
        let folder = bases.folder(damage.base)
        let fm = FileManager.default
        func fresh() throws {
            for name in try fm.contentsOfDirectory(atPath: folder) {
                try? fm.removeItem(atPath: dir.file(name))
                try fm.copyItem(atPath: "\(folder)/\(name)", toPath: dir.file(name))
            }
            try damage.apply(try CorruptImageLayout(dir.file("image.qcow2")))
        }
        try fresh()
        let image = dir.file("image.qcow2")
        let binary = try QBackupBinary.path()
        let check = try Bounded.run([binary, "check", image], mebibytes: 1024, seconds: 10)
        let damaged = check.status == 1 || check.status == 2
        let commands: [[String]] = [
            ["backup", image, "--repo", dir.file("repo")], ["bitmap", "add", image, "new"],
            ["bitmap", "remove", image, "b0"], ["bitmap", "clear", image, "b0"], ["bitmap", "enable", image, "b1"],
            ["bitmap", "disable", image, "b0"], ["bitmap", "merge", image, "b0", "--source", "b1"], ["commit", image],
        ]
        var statuses: [String] = []
        for args in commands {
            let label = "\(damage.name): \(args.prefix(args[0] == "bitmap" ? 2 : 1).joined(separator: " "))"
            let before = try Data.contents(of: image)
            let backing = fm.fileExists(atPath: dir.file("backing.qcow2")) ? try Data.contents(of: dir.file("backing.qcow2")) : nil
            let result = try Bounded.run([binary] + args, mebibytes: 1024, seconds: 20)
            statuses.append("\(args[0] == "bitmap" ? args[1] : args[0])=\(result.status)")
            #expect([0, 1].contains(result.status), "\(label): exit \(result.status): \(result.stderr)")
            if damaged {
                #expect(result.status == 1, "\(label): check finds damage (exit \(check.status)) but the command succeeded")
            }
            if result.status != 0 {
                let lines = result.stderr.split(separator: "\n")
                #expect(lines.count == 1 && lines[0].hasPrefix("qbackup: error: "), "\(label): \(result.stderr)")
                #expect(try Data.contents(of: image) == before, "\(label) failed but changed the image")
                if let backing {
                    #expect(try Data.contents(of: dir.file("backing.qcow2")) == backing, "\(label) failed but changed the backing file")
                }
            } else {
                try fresh()  // it wrote: the next command starts from the damaged image again
            }
            try? fm.removeItem(atPath: dir.file("repo"))
        }
        print("corrupt corpus writes: \(damage.name): check=\(check.status) \(statuses.joined(separator: " "))")
    }

    /// Writes `value` big-endian at `at(layout)`.
    static func set<T: FixedWidthInteger & Sendable>(_ name: String, _ value: T, on base: Base = .v3,
                                                      at: @escaping @Sendable (CorruptImageLayout) throws -> UInt64) -> Damage {
        Damage(name: name, base: base) { layout in try poke(layout.path, at: try at(layout), be(value)) }
    }

    /// Replaces the backing file name (same length, so backing_file_size stays right).
    static func name(_ label: String, _ replacement: String) -> Damage {
        Damage(name: label, base: .v3, namesOffset: false) { layout in
            let at = try layout.u64(8)
            let size = Int(try layout.u32(16))
            let bytes = Array(replacement.utf8)
            precondition(bytes.count == size, "'\(replacement)' is \(bytes.count) bytes, the name field \(size)")
            try poke(layout.path, at: at, bytes)
        }
    }

    static let copied: UInt64 = 1 << 63
    static let compressed: UInt64 = 1 << 62
    static let past: UInt64 = 1 << 40

    static var structureDamages: [Damage] {
        let l1: @Sendable (CorruptImageLayout) throws -> UInt64 = { $0.l1Offset }
        let l2: @Sendable (CorruptImageLayout) throws -> UInt64 = { try $0.l2Entry { $0 & CorruptImageLayout.offsetMask != 0 && $0 & compressed == 0 } }
        let l2Compressed: @Sendable (CorruptImageLayout) throws -> UInt64 = { try $0.l2Entry { $0 & compressed != 0 } }
        let l2Zero: @Sendable (CorruptImageLayout) throws -> UInt64 = { try $0.l2Entry { $0 & 1 != 0 } }
        let refcountTable: @Sendable (CorruptImageLayout) throws -> UInt64 = { $0.refcountTableOffset }
        let refcountBlock: @Sendable (CorruptImageLayout) throws -> UInt64 = { try $0.firstRefcountBlock() }
        let snapshot: @Sendable (CorruptImageLayout) throws -> UInt64 = { $0.snapshotsOffset }
        let bitmapsExt: @Sendable (CorruptImageLayout) throws -> UInt64 = { try $0.extensionData(CorruptImageLayout.bitmapsExtension) }
        let directory: @Sendable (CorruptImageLayout) throws -> UInt64 = { try $0.bitmapDirectory() }
        let bitmapTable: @Sendable (CorruptImageLayout) throws -> UInt64 = { try $0.firstBitmapTableDataEntry() }
        let backingFormat: @Sendable (CorruptImageLayout) throws -> UInt64 = { try $0.extensionHeader(CorruptImageLayout.backingFormatExtension) }
        return [
            // Header extensions (qcow2.rst "Header extensions").
            set("extension backing format: type = unknown", UInt32(0x1234_5678), at: backingFormat),
            set("extension backing format: length = 0xffffffff", UInt32.max, at: { try backingFormat($0) + 4 }),
            set("extension backing format: name = 'qcow3'", Array("qcow3".utf8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) } << 24,
                at: { try backingFormat($0) + 8 }),
            set("extension backing format: length = 3 (shorter than the name)", UInt32(3), at: { try backingFormat($0) + 4 }),
            set("extension bitmaps: length runs past the first cluster", UInt32(0x1000),
                at: { try $0.extensionHeader(CorruptImageLayout.bitmapsExtension) + 4 }),
            set("extension end marker missing (garbage after the last extension)", UInt64.max, at: { layout in
                let last = try #require(layout.extensions.last)
                return last.offset + 8 + (last.length + 7) & ~7
            }),
            // Backing file name (qcow2.rst "Header", backing_file_offset/size).
            name("backing file name: a missing file", "nothere.qcow2"),
            name("backing file name: a directory", "/tmp/////////"),
            name("backing file name: the image itself", "image.qcow2\0\0"),
            // L1 table (qcow2.rst "Cluster mapping").
            set("L1 entry 0 = all ones", UInt64.max, at: l1),
            set("L1 entry 0: reserved bits 1-8 set", UInt64(0x1fe), at: l1),
            set("L1 entry 0: L2 offset unaligned", copied | 0x1200, at: l1),
            set("L1 entry 0: L2 offset past end of file", copied | past, at: l1),
            set("L1 entry 0: COPIED set, offset 0", copied, at: l1),
            Damage(name: "L1 entry 0: L2 table is the L1 table itself", base: .v3) { layout in
                try poke(layout.path, at: layout.l1Offset, be(copied | layout.l1Offset))
            },
            Damage(name: "L1 entry 0: L2 table is the refcount table", base: .v3) { layout in
                try poke(layout.path, at: layout.l1Offset, be(copied | layout.refcountTableOffset))
            },
            Damage(name: "L1 entry 0: COPIED flag cleared", base: .v3) { layout in
                try poke(layout.path, at: layout.l1Offset, be(try layout.u64(layout.l1Offset) & ~copied))
            },
            // L2 tables.
            set("L2 entry: all ones", UInt64.max, at: l2),
            set("L2 entry: data offset unaligned", copied | 0x3200, at: l2),
            set("L2 entry: data offset past end of file", copied | past, at: l2),
            set("L2 entry: data cluster is the refcount table", copied | 0x1000, at: l2),
            set("L2 entry: reserved bits 1-8 set", copied | 0x1fe, at: l2),
            set("L2 entry: zero flag with an unaligned offset", UInt64(0x3201), at: l2Zero),
            set("L2 entry: compressed, all sectors", compressed | (UInt64.max >> 2), at: l2Compressed),
            set("L2 entry: compressed, offset past end of file", compressed | past, at: l2Compressed),
            set("L2 entry: compressed, points at the header", compressed, at: l2Compressed),
            set("extended L2 entry: subcluster both allocated and zero", UInt64(0x0000_0001_0000_0001), on: .extendedL2,
                at: { try $0.l2Entry { $0 != 0 } + 8 }),
            set("extended L2 entry: allocation bitmap all ones", UInt64.max, on: .extendedL2, at: { try $0.l2Entry { $0 != 0 } + 8 }),
            set("extended L2 entry: allocated subclusters without a host cluster", UInt64(0), on: .extendedL2, at: { try $0.l2Entry { $0 != 0 } }),
            // Refcount table and blocks (qcow2.rst "Host cluster management").
            set("refcount table entry 0 = 0", UInt64(0), at: refcountTable),
            set("refcount table entry 0: unaligned", UInt64(0x1200), at: refcountTable),
            set("refcount table entry 0: past end of file", past, at: refcountTable),
            set("refcount table entry 0 = all ones", UInt64.max, at: refcountTable),
            set("refcount block entry 0 (header cluster) = 0", UInt16(0), at: refcountBlock),
            set("refcount block entry 0 (header cluster) = 0xffff", UInt16.max, at: refcountBlock),
            set("refcount block: every entry 0", UInt64(0), at: refcountBlock),
            // Snapshot table (qcow2.rst "Snapshots").
            set("snapshot 0: l1_table_offset unaligned", UInt64(0x1200), at: snapshot),
            set("snapshot 0: l1_table_offset past end of file", past, at: snapshot),
            set("snapshot 0: l1_size huge", UInt32.max, at: { $0.snapshotsOffset + 8 }),
            set("snapshot 0: id_str_size huge", UInt16.max, at: { $0.snapshotsOffset + 12 }),
            set("snapshot 0: name_size huge", UInt16.max, at: { $0.snapshotsOffset + 14 }),
            set("snapshot 0: extra_data_size huge", UInt32.max, at: { $0.snapshotsOffset + 36 }),
            set("v2 snapshot 0: l1_table_offset unaligned", UInt64(0x1201), on: .v2, at: snapshot),
            set("v2 snapshot 0: name_size huge", UInt16.max, on: .v2, at: { $0.snapshotsOffset + 14 }),
            // Bitmaps extension (qcow2.rst "Bitmaps extension").
            set("bitmaps extension: nb_bitmaps = 0", UInt32(0), at: bitmapsExt),
            set("bitmaps extension: nb_bitmaps = 65536", UInt32(65536), at: bitmapsExt),
            set("bitmaps extension: reserved bytes set", UInt32(1), at: { try bitmapsExt($0) + 4 }),
            set("bitmaps extension: bitmap_directory_size = 0", UInt64(0), at: { try bitmapsExt($0) + 8 }),
            set("bitmaps extension: bitmap_directory_size huge", UInt64.max, at: { try bitmapsExt($0) + 8 }),
            set("bitmaps extension: bitmap_directory_offset unaligned", UInt64(0x1208), at: { try bitmapsExt($0) + 16 }),
            set("bitmaps extension: bitmap_directory_offset past end of file", past, at: { try bitmapsExt($0) + 16 }),
            set("bitmaps extension: length = 8", UInt32(8), at: { try $0.extensionHeader(CorruptImageLayout.bitmapsExtension) + 4 }),
            // Bitmap directory entries (qcow2.rst "Bitmap directory").
            set("bitmap directory entry 0: bitmap_table_offset unaligned", UInt64(0x1208), at: directory),
            set("bitmap directory entry 0: bitmap_table_offset past end of file", past, at: directory),
            set("bitmap directory entry 0: bitmap_table_size = 0", UInt32(0), at: { try directory($0) + 8 }),
            set("bitmap directory entry 0: bitmap_table_size huge", UInt32.max, at: { try directory($0) + 8 }),
            set("bitmap directory entry 0: flags reserved bits", UInt32(0xffff_fff8), at: { try directory($0) + 12 }),
            set("bitmap directory entry 0: flags in_use", UInt32(3), at: { try directory($0) + 12 }),
            set("bitmap directory entry 0: type 2", UInt8(2), at: { try directory($0) + 16 }),
            set("bitmap directory entry 0: granularity_bits 8", UInt8(8), at: { try directory($0) + 17 }),
            set("bitmap directory entry 0: granularity_bits 63", UInt8(63), at: { try directory($0) + 17 }),
            set("bitmap directory entry 0: name_size 0", UInt16(0), at: { try directory($0) + 18 }),
            set("bitmap directory entry 0: name_size huge", UInt16.max, at: { try directory($0) + 18 }),
            set("bitmap directory entry 0: extra_data_size huge", UInt32.max, at: { try directory($0) + 20 }),
            set("bitmap directory entry 0: extra_data_size 8, incompatible", UInt32(8), at: { try directory($0) + 20 }),
            set("bitmap directory entry 1: same name as entry 0", UInt16(0x6230), at: { layout in
                // Entry 0 is 24 bytes + name "b0", padded to 32; entry 1's name "b1" starts at 32 + 24.
                try directory(layout) + 32 + 24
            }),
            // Bitmap tables (qcow2.rst "Bitmap table").
            set("bitmap table entry: reserved bits set", UInt64(0x1fe), at: bitmapTable),
            set("bitmap table entry: offset unaligned", UInt64(0x1200), at: bitmapTable),
            set("bitmap table entry: offset past end of file", past, at: bitmapTable),
            set("bitmap table entry: all ones", UInt64.max, at: bitmapTable),
            set("bitmap table entry: data is the header", UInt64(0), at: bitmapTable),
        ]
    }

    static var damages: [Damage] { headerDamages + structureDamages }

    // MARK: - Running the commands

    struct Command {
        var args: [String]
        /// Exit statuses DESIGN.md allows for this command.
        var allowed: Set<Int32>
        /// Exit statuses that mean "failed with an error message".
        var errorStatuses: Set<Int32>
        var jsonStdout: Bool
    }

    static func commands(image: String, pristine: String, out: String, repo: String) -> [Command] {
        [
            Command(args: ["info", "--output", "json", image], allowed: [0, 1], errorStatuses: [1], jsonStdout: true),
            Command(args: ["info", "--backing-chain", image], allowed: [0, 1], errorStatuses: [1], jsonStdout: false),
            Command(args: ["map", "--output", "json", image], allowed: [0, 1], errorStatuses: [1], jsonStdout: true),
            // qemu-img check's statuses: 0 clean, 1 could not complete, 2 corruptions, 3 only leaks.
            Command(args: ["check", "--output", "json", image], allowed: [0, 1, 2, 3], errorStatuses: [1], jsonStdout: true),
            // An image is never different from itself: 0 identical or 2 error.
            Command(args: ["compare", image, image], allowed: [0, 2], errorStatuses: [2], jsonStdout: false),
            Command(args: ["compare", pristine, image], allowed: [0, 1, 2], errorStatuses: [2], jsonStdout: false),
            Command(args: ["flatten", image, out, "--format", "raw"], allowed: [0, 1], errorStatuses: [1], jsonStdout: false),
            Command(args: ["bitmap", "list", "--output", "json", image], allowed: [0, 1], errorStatuses: [1], jsonStdout: true),
            Command(args: ["bitmap", "dump", "--output", "json", image, "b0"], allowed: [0, 1], errorStatuses: [1], jsonStdout: true),
            // --dry-run changes nothing, so the image must stay byte-identical even when it succeeds.
            Command(args: ["backup", image, "--repo", repo, "--dry-run"], allowed: [0, 1], errorStatuses: [1], jsonStdout: false),
        ]
    }

    @Test(arguments: damages)
    func damagedField(_ damage: Damage) throws {
        let bases = try Self.bases.get()
        let dir = TempDir("qbackup-corrupt")
        let folder = bases.folder(damage.base)
        for name in try FileManager.default.contentsOfDirectory(atPath: folder) {
            try FileManager.default.copyItem(atPath: "\(folder)/\(name)", toPath: dir.file(name))
        }
        let image = dir.file("image.qcow2")
        try FileManager.default.copyItem(atPath: image, toPath: dir.file("pristine.qcow2"))
        try damage.apply(try CorruptImageLayout(image))
        let damaged = try Data.contents(of: image)
        let backing = FileManager.default.fileExists(atPath: dir.file("backing.qcow2")) ? try Data.contents(of: dir.file("backing.qcow2")) : nil
        // backup --dry-run plans against an existing (empty) repository folder.
        try FileManager.default.createDirectory(atPath: dir.file("repo"), withIntermediateDirectories: true)
        let binary = try QBackupBinary.path()
        // Whether the metadata is damaged at all: then a read-only command that succeeds says so.
        let checkRun = try Bounded.run([binary, "check", image], mebibytes: 1024, seconds: 10)
        let checked = checkRun.status
        // A file without the qcow2 magic is a raw image to the read-only commands, not a damaged qcow2.
        let damagedMetadata = checked == 2 || (checked == 1 && !checkRun.stderr.contains("not a qcow2"))
        let rescuers: Set<String> = ["info", "map", "compare", "flatten", "bitmap list", "bitmap dump"]
        var statuses: [String] = []
        for command in Self.commands(image: image, pristine: dir.file("pristine.qcow2"), out: dir.file("out.raw"),
                                         repo: dir.file("repo")) {
            let verb = command.args[0] == "bitmap" ? "bitmap \(command.args[1])" : command.args[0]
            let label = "\(damage.name): \(verb) \(command.args.dropFirst().filter { $0.hasPrefix("-") }.joined(separator: " "))"
            // 1 GiB of address space and 10 seconds: an allocation sized by an untrusted
            // field, or a loop that does not end, fails the case.
            let started = Date()
            let result = try Bounded.run([binary] + command.args, mebibytes: 1024, seconds: 10)
            let elapsed = Date().timeIntervalSince(started)
            statuses.append("\(verb)=\(result.status)")
            #expect(command.allowed.contains(result.status), "\(label): exit \(result.status), stderr: \(result.stderr)")
            #expect(elapsed < 5, "\(label) took \(elapsed) s")
            let errorLines = result.stderr.split(separator: "\n").filter { $0.hasPrefix("qbackup: error:") }
            if command.errorStatuses.contains(result.status) {
                #expect(errorLines.count == 1, "\(label): want one error line: \(result.stderr)")
                #expect(result.stderr.split(separator: "\n").count == 1, "\(label): stderr is more than the error line: \(result.stderr)")
                let line = String(errorLines.first ?? "")
                // A bitmap that is not there (its name damaged, or an image without bitmaps), or a
                // file without the qcow2 magic (raw to every command, refused by backup), is not a format error.
                let notFormatError = line.contains("no bitmap named") || line.contains("is a raw image")
                if damage.namesOffset && !notFormatError {
                    #expect(line.contains("at offset 0x"), "\(label): the error names no offset: \(line)")
                }
                #expect(line.contains(dir.path), "\(label): the error names no file: \(line)")
            } else {
                #expect(errorLines.isEmpty, "\(label): exit \(result.status) with an error line: \(result.stderr)")
                if damagedMetadata && rescuers.contains(verb) {
                    // DESIGN "Damaged images": one warning line naming file, structure and offset.
                    let warnings = result.stderr.split(separator: "\n").filter { $0.hasPrefix("qbackup: warning: ") }
                    let damageWarnings = warnings.filter { $0.hasSuffix("; run 'qbackup check'") }
                    #expect(damageWarnings.count == 1, "\(label): check exits \(checked), want one damage warning: \(result.stderr)")
                    if let line = damageWarnings.first {
                        #expect(line.contains(dir.path), "\(label): the warning names no file: \(line)")
                        if damage.namesOffset { #expect(line.contains("at offset 0x"), "\(label): the warning names no offset: \(line)") }
                    }
                }
                if command.jsonStdout {
                    #expect((try? JSONHelpers.parse(result.stdout)) != nil, "\(label): stdout is not JSON: \(result.stdout.prefix(200))")
                }
            }
            #expect(try Data.contents(of: image) == damaged, "\(label) changed the image")
            if let backing { #expect(try Data.contents(of: dir.file("backing.qcow2")) == backing, "\(label) changed the backing file") }
            if command.args[0] == "flatten" {
                let exists = FileManager.default.fileExists(atPath: dir.file("out.raw"))
                if result.status != 0 {
                    #expect(!exists, "\(label) failed but left its output behind")
                } else {
                    #expect(exists, "\(label) succeeded but wrote no output")
                }
                try? FileManager.default.removeItem(atPath: dir.file("out.raw"))
            }
        }
        // The statuses per damaged field, so the run's log lists every field and what each command said.
        print("corrupt corpus: \(damage.name): \(statuses.joined(separator: " "))")
    }
}
