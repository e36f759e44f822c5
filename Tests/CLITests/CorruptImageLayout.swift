import Foundation
import TestSupport

/// Where the metadata of a qcow2 file lives, found by reading it independently
/// of the library (spec offsets, qcow2.rst), so the corrupt-image corpus can
/// damage each structure at its named offset.
struct CorruptImageLayout {
    var path: String
    var clusterSize: UInt64
    var headerLength: UInt64
    var l1Offset: UInt64
    var l1Size: UInt64
    var refcountTableOffset: UInt64
    var snapshotsOffset: UInt64
    var nbSnapshots: UInt64
    /// Header extensions: type, offset of the 8-byte type/length header, data length.
    var extensions: [(type: UInt32, offset: UInt64, length: UInt64)] = []

    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00

    init(_ path: String) throws {
        self.path = path
        func u32(_ at: UInt64) throws -> UInt64 { try peek(path, at: at, count: 4).reduce(0) { $0 << 8 | UInt64($1) } }
        func u64(_ at: UInt64) throws -> UInt64 { try peek(path, at: at, count: 8).reduce(0) { $0 << 8 | UInt64($1) } }
        clusterSize = 1 << (try u32(20))
        headerLength = try u32(4) >= 3 ? try u32(100) : 72
        l1Size = try u32(36)
        l1Offset = try u64(40)
        refcountTableOffset = try u64(48)
        nbSnapshots = try u32(60)
        snapshotsOffset = try u64(64)
        var at = headerLength
        while at + 8 <= clusterSize {
            let type = UInt32(try u32(at))
            if type == 0 { break }
            let length = try u32(at + 4)
            extensions.append((type, at, length))
            at += 8 + (length + 7) & ~7
        }
    }

    func u64(_ at: UInt64) throws -> UInt64 { try peek(path, at: at, count: 8).reduce(0) { $0 << 8 | UInt64($1) } }
    func u32(_ at: UInt64) throws -> UInt64 { try peek(path, at: at, count: 4).reduce(0) { $0 << 8 | UInt64($1) } }

    /// The offset of the first allocated L2 table.
    func firstL2() throws -> UInt64 {
        for i in 0..<l1Size {
            let entry = try u64(l1Offset + i * 8) & Self.offsetMask
            if entry != 0 { return entry }
        }
        throw Missing(what: "an L2 table")
    }

    /// The file offset of the first L2 entry whose raw value satisfies `match`.
    func l2Entry(where match: (UInt64) -> Bool) throws -> UInt64 {
        let l2 = try firstL2()
        let bytes = try peek(path, at: l2, count: Int(clusterSize))
        for i in stride(from: 0, to: bytes.count, by: 8) {
            let value = bytes[i..<(i + 8)].reduce(0) { $0 << 8 | UInt64($1) }
            if match(value) { return l2 + UInt64(i) }
        }
        throw Missing(what: "a matching L2 entry")
    }

    /// The first refcount block.
    func firstRefcountBlock() throws -> UInt64 { try u64(refcountTableOffset) & Self.offsetMask }

    /// The offset of the data of extension `type`.
    func extensionData(_ type: UInt32) throws -> UInt64 {
        guard let ext = extensions.first(where: { $0.type == type }) else {
            throw Missing(what: "header extension 0x\(String(type, radix: 16))")
        }
        return ext.offset + 8
    }

    /// The extension header (type, length) of extension `type`.
    func extensionHeader(_ type: UInt32) throws -> UInt64 { try extensionData(type) - 8 }

    static let bitmapsExtension: UInt32 = 0x2385_2875
    static let backingFormatExtension: UInt32 = 0xe279_2aca
    static let featureTableExtension: UInt32 = 0x6803_f857

    /// The bitmap directory (from the bitmaps extension).
    func bitmapDirectory() throws -> UInt64 { try u64(try extensionData(Self.bitmapsExtension) + 16) }

    /// The bitmap table of the first directory entry.
    func firstBitmapTable() throws -> UInt64 { try u64(try bitmapDirectory()) }

    /// The first non-zero entry of the first bitmap table.
    func firstBitmapTableDataEntry() throws -> UInt64 {
        let table = try firstBitmapTable()
        let size = try u32(try bitmapDirectory() + 8)
        for i in 0..<size where try u64(table + i * 8) & Self.offsetMask != 0 { return table + i * 8 }
        throw Missing(what: "a bitmap table entry pointing at data")
    }

    struct Missing: Error, CustomStringConvertible {
        var what: String
        var description: String { "the base image has no \(what)" }
    }
}
