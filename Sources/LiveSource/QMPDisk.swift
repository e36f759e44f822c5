import FoundationEssentials

/// A disk of a running QEMU as QMP reports it: its qcow2 format node, the image
/// file behind it and the dirty bitmaps on it. Everything QEMU sends is checked
/// before it is used (names, sizes, types).
struct QMPDisk {
    /// One named bitmap of `query-named-block-nodes` → `dirty-bitmaps` (anonymous ones are skipped).
    struct Bitmap: Equatable {
        var name: String
        var recording: Bool
        var persistent: Bool
        var busy: Bool
        var inconsistent: Bool
        var count: UInt64
        var granularity: UInt64
    }

    let node: String
    /// The image file QEMU opened for the node (absolute path): the repository's source.
    let file: String
    let virtualSize: UInt64
    let bitmaps: [String: Bitmap]

    /// Finds `node` (or, when nil, the one disk of the VM) and checks that it is a qcow2 format node.
    static func find(_ qmp: QMPClient, node wanted: String?) throws -> QMPDisk {
        let name: String
        if let wanted {
            name = wanted
        } else {
            let devices = try qmp.execute("query-block") as? [[String: Any]] ?? []
            let disks = devices.compactMap { ($0["inserted"] as? [String: Any])?["node-name"] as? String }
            guard disks.count == 1, let only = disks.first else {
                let names = devices.compactMap { $0["qdev"] as? String ?? $0["device"] as? String }
                throw LiveError(.invalidArgument, disks.isEmpty
                    ? "the VM has no disk with a medium; name the qcow2 node with --node"
                    : "the VM has \(disks.count) disks (\(names.joined(separator: ", ")); nodes \(disks.joined(separator: ", "))); name one with --node")
            }
            name = only
        }
        let nodes = try qmp.execute("query-named-block-nodes", ["flat": true]) as? [[String: Any]] ?? []
        if wanted == nil, name.hasPrefix("qb-cbw-"),
           let filter = nodes.first(where: { $0["node-name"] as? String == name }) {
            // A killed qbackup left its copy-before-write filter on top of the disk: the disk is
            // the qcow2 node of the same file under it (the next steps remove the filter).
            let file = filter["file"] as? String
            let under = nodes.filter {
                $0["drv"] as? String == "qcow2" && $0["file"] as? String == file
                    && !(($0["node-name"] as? String)?.hasPrefix("qb-") ?? true)
            }
            guard under.count == 1, let node = under.first?["node-name"] as? String else {
                throw LiveError(.invalidArgument, "the disk is behind qbackup's leftover filter '\(name)'; name its qcow2 node with --node")
            }
            return try find(qmp, node: node)
        }
        guard let info = nodes.first(where: { $0["node-name"] as? String == name }) else {
            let known = nodes.compactMap { $0["node-name"] as? String }
            throw LiveError(.invalidArgument, "QEMU has no block node '\(name)' (nodes: \(known.joined(separator: ", ")))")
        }
        let driver = info["drv"] as? String ?? "?"
        guard driver == "qcow2" else {
            throw LiveError(.invalidArgument,
                            "node '\(name)' is a \(driver) node; qbackup backs up the disk's qcow2 format node (its persistent bitmap lives in the qcow2 file)")
        }
        let image = info["image"] as? [String: Any] ?? [:]
        guard let file = (image["filename"] as? String) ?? (info["file"] as? String), file.hasPrefix("/") else {
            throw LiveError(.unsupported, "QEMU does not report node '\(name)' as an image file with an absolute path")
        }
        guard let size = QMPJSON.uint64(image["virtual-size"]), size > 0 else {
            throw LiveError(.invalidFormat, "QEMU reports no virtual size for node '\(name)'")
        }
        var bitmaps: [String: Bitmap] = [:]
        for entry in info["dirty-bitmaps"] as? [[String: Any]] ?? [] {
            // Internal bitmaps (a backup job's) have no name.
            guard let bitmapName = entry["name"] as? String else { continue }
            bitmaps[bitmapName] = Bitmap(name: bitmapName, recording: entry["recording"] as? Bool ?? false,
                                         persistent: entry["persistent"] as? Bool ?? false,
                                         busy: entry["busy"] as? Bool ?? false,
                                         inconsistent: entry["inconsistent"] as? Bool ?? false,
                                         count: QMPJSON.uint64(entry["count"]) ?? 0,
                                         granularity: QMPJSON.uint64(entry["granularity"]) ?? 0)
        }
        return QMPDisk(node: name, file: file, virtualSize: size, bitmaps: bitmaps)
    }
}
