import CLibvirt
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A connection to libvirt (`qemu:///system`, `qemu+ssh://host/system`, …).
final class LibvirtConnection {
    let lib: LibVirt
    let handle: LibVirt.Connection
    /// The URI as given (what the repository records).
    let uri: String

    init(uri: String) throws {
        let lib = try LibVirt.shared()
        self.lib = lib
        guard let handle = uri.withCString({ lib.connectOpen($0) }) else {
            throw LiveError(.io, "cannot connect to libvirt at \(uri): \(lib.lastError().message)")
        }
        self.handle = handle
        self.uri = uri
    }

    /// Whether the URI names another host: its disk files are then not reachable from here.
    var isRemote: Bool {
        guard let schemeEnd = uri.firstRange(of: "://") else { return false }
        let rest = uri[schemeEnd.upperBound...]
        let authority = rest.prefix { $0 != "/" && $0 != "?" }
        return !authority.isEmpty || uri[..<schemeEnd.lowerBound].contains("+")
    }

    /// The host of a remote URI (`qemu+ssh://root@host:22/system` → `host`), where its NBD
    /// exports listen; nil for a local one.
    var host: String? {
        guard isRemote, let schemeEnd = uri.firstRange(of: "://") else { return nil }
        var authority = String(uri[schemeEnd.upperBound...].prefix { $0 != "/" && $0 != "?" })
        if let at = authority.lastIndex(of: "@") { authority = String(authority[authority.index(after: at)...]) }
        if authority.hasPrefix("["), let close = authority.firstIndex(of: "]") {
            return String(authority[authority.index(after: authority.startIndex)..<close])
        }
        if let colon = authority.firstIndex(of: ":") { authority = String(authority[..<colon]) }
        return authority.isEmpty ? nil : authority
    }

    /// The domain named `name` (or with that UUID); when it is not found and the repository
    /// records a UUID, the domain with that UUID (a renamed domain is followed).
    func domain(_ name: String, recordedUUID: String?) throws -> LibvirtDomain {
        if let d = name.withCString({ lib.lookupByName(handle, $0) }) { return LibvirtDomain(self, d) }
        let notFound = lib.lastError()
        if UUID(uuidString: name) != nil, let d = name.withCString({ lib.lookupByUUIDString(handle, $0) }) {
            return LibvirtDomain(self, d)
        }
        if let uuid = recordedUUID, let d = uuid.withCString({ lib.lookupByUUIDString(handle, $0) }) {
            return LibvirtDomain(self, d)
        }
        throw LiveError(.invalidArgument, "libvirt at \(uri) has no domain '\(name)': \(notFound.message)")
    }

    func close() { _ = lib.connectClose(handle) }
}

/// One libvirt domain: its identity, state, disks, jobs and checkpoints.
final class LibvirtDomain {
    let connection: LibvirtConnection
    let handle: LibVirt.Domain
    var lib: LibVirt { connection.lib }

    init(_ connection: LibvirtConnection, _ handle: LibVirt.Domain) {
        self.connection = connection
        self.handle = handle
    }

    deinit { _ = lib.domainFree(handle) }

    var name: String { lib.domainGetName(handle).map { String(cString: $0) } ?? "?" }

    var uuid: String {
        var buffer = [CChar](repeating: 0, count: 37)
        _ = lib.domainGetUUIDString(handle, &buffer)
        return String(cString: buffer)
    }

    /// libvirt's error for the last call, as a LiveError (a busy domain is `.locked`: exit 75).
    func failure(_ what: String) -> LiveError {
        let (code, message) = lib.lastError()
        let busy = message.contains("cannot acquire state change lock") || code == Int32(VIR_ERR_OPERATION_TIMEOUT.rawValue)
        return LiveError(busy ? .locked : .io, "domain '\(name)': \(what): \(message)")
    }

    /// Whether the domain has a running QEMU (running, paused, …), as opposed to shut off.
    func isActive() throws -> Bool {
        var state: Int32 = 0
        var reason: Int32 = 0
        guard lib.domainGetState(handle, &state, &reason, 0) == 0 else { throw failure("cannot read its state") }
        return state != Int32(VIR_DOMAIN_SHUTOFF.rawValue) && state != Int32(VIR_DOMAIN_NOSTATE.rawValue)
            && state != Int32(VIR_DOMAIN_CRASHED.rawValue)
    }

    func xml(inactive: Bool = false) throws -> String {
        guard let xml = LibVirt.take(lib.domainGetXMLDesc(handle, inactive ? UInt32(VIR_DOMAIN_XML_INACTIVE.rawValue) : 0))
        else { throw failure("cannot read its XML") }
        return xml
    }

    /// A disk of the domain, from its XML.
    struct Disk: Equatable {
        var target: String
        /// The image file (type file), or the block device; nil for a network disk.
        var file: String?
        var format: String?
    }

    /// The domain's disks (`device='disk'`; CD-ROMs and floppies are not backed up).
    func disks() throws -> [Disk] {
        try LibvirtXML.elements("disk", in: xml()).compactMap { element in
            guard (element.attributes["device"] ?? "disk") == "disk" else { return nil }
            guard let target = LibvirtXML.elements("target", in: element.body).first?.attributes["dev"] else { return nil }
            // The first <source> is the disk's own (later ones belong to its backingStore).
            let source = LibvirtXML.elements("source", in: element.body).first?.attributes
            let format = LibvirtXML.elements("driver", in: element.body).first?.attributes["type"]
            return Disk(target: target, file: source?["file"] ?? source?["dev"], format: format)
        }
    }

    /// The uid:gid QEMU runs as (the DAC label of the running domain), if libvirt says.
    func qemuOwner() throws -> (uid: uid_t, gid: gid_t)? {
        for label in LibvirtXML.elements("seclabel", in: try xml()) where label.attributes["model"] == "dac" {
            guard let text = LibvirtXML.elements("label", in: label.body).first?.body else { continue }
            let parts = text.split(separator: ":").map { $0.filter { $0 != "+" && $0 != " " } }
            if parts.count == 2, let uid = UInt32(parts[0]), let gid = UInt32(parts[1]) { return (uid, gid) }
        }
        return nil
    }

    /// The disk's size as the guest sees it.
    func capacity(of target: String) throws -> UInt64 {
        var info = virDomainBlockInfo()
        guard target.withCString({ lib.domainGetBlockInfo(handle, $0, &info, 0) }) == 0 else {
            throw failure("cannot read the size of disk \(target)")
        }
        return info.capacity
    }

    // MARK: jobs

    /// `currentJob()`'s operation for a backup job (VIR_DOMAIN_JOB_OPERATION_BACKUP).
    static let backupOperation = Int32(VIR_DOMAIN_JOB_OPERATION_BACKUP.rawValue)

    /// The domain's current job: nil when there is none, else its operation (9 = backup).
    func currentJob() throws -> Int32? {
        var type: Int32 = 0
        var params: virTypedParameterPtr?
        var count: Int32 = 0
        guard lib.getJobStats(handle, &type, &params, &count, 0) == 0 else { throw failure("cannot read its job") }
        defer { lib.typedParamsFree(params, count) }
        guard type != Int32(VIR_DOMAIN_JOB_NONE.rawValue) else { return nil }
        var operation: Int32 = 0
        _ = lib.typedParamsGetInt(params, count, "operation", &operation)
        return operation
    }

    /// The running backup job's XML (nil when there is none).
    func backupXML() -> String? { LibVirt.take(lib.backupGetXMLDesc(handle, 0)) }

    func beginBackup(_ backupXML: String, checkpointXML: String?) throws {
        let rc = backupXML.withCString { b in
            checkpointXML.map { c in c.withCString { lib.backupBegin(handle, b, $0, 0) } } ?? lib.backupBegin(handle, b, nil, 0)
        }
        guard rc == 0 else { throw failure("cannot begin the backup job") }
    }

    /// Ends the job (abort is how a pull-mode backup ends), waits until libvirt has let go of
    /// it, and returns the completed job's statistics (kept for other readers).
    @discardableResult
    func abortJob(timeout: TimeInterval = 30) throws -> [String: UInt64] {
        if lib.abortJob(handle) != 0, try currentJob() != nil { throw failure("cannot end the backup job") }
        let deadline = Date().addingTimeInterval(timeout)
        while try currentJob() != nil {
            guard Date() < deadline else { throw LiveError(.io, "domain '\(name)': the backup job did not end within \(Int(timeout)) s") }
            usleep(10_000)
        }
        var type: Int32 = 0
        var params: virTypedParameterPtr?
        var count: Int32 = 0
        let flags = UInt32(VIR_DOMAIN_JOB_STATS_COMPLETED.rawValue | VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED.rawValue)
        guard lib.getJobStats(handle, &type, &params, &count, flags) == 0 else { return [:] }
        defer { lib.typedParamsFree(params, count) }
        var stats: [String: UInt64] = [:]
        for key in ["disk_temp_used", "disk_temp_total", "time_elapsed"] {
            var value: UInt64 = 0
            if lib.typedParamsGetULLong(params, count, key, &value) == 1 { stats[key] = value }
        }
        return stats
    }

    // MARK: checkpoints

    /// A checkpoint: its name and its parent's.
    struct Checkpoint: Equatable {
        var name: String
        var parent: String?
    }

    /// Every checkpoint of the domain, parents before children.
    func checkpoints() throws -> [Checkpoint] {
        var list: UnsafeMutablePointer<LibVirt.Checkpoint?>?
        let n = lib.listAllCheckpoints(handle, &list, UInt32(VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL.rawValue))
        guard n >= 0 else { throw failure("cannot list its checkpoints") }
        defer { free(list) }
        var result: [Checkpoint] = []
        for i in 0..<Int(n) {
            guard let cp = list?[i] else { continue }
            defer { _ = lib.checkpointFree(cp) }
            let name = lib.checkpointGetName(cp).map { String(cString: $0) } ?? ""
            let xml = LibVirt.take(lib.checkpointGetXMLDesc(cp, UInt32(VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN.rawValue))) ?? ""
            let parent = LibvirtXML.elements("parent", in: xml).first
                .flatMap { LibvirtXML.elements("name", in: $0.body).first?.body }
            result.append(Checkpoint(name: name, parent: parent.map(LibvirtXML.unescape)))
        }
        return result
    }

    /// The bytes changed since checkpoint `name` on disk `target` (libvirt's `size`), if known.
    func changedSince(_ name: String, disk target: String) -> UInt64? {
        guard let cp = name.withCString({ lib.checkpointLookupByName(handle, $0, 0) }) else { return nil }
        defer { _ = lib.checkpointFree(cp) }
        let flags = UInt32(VIR_DOMAIN_CHECKPOINT_XML_SIZE.rawValue | VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN.rawValue)
        guard let xml = LibVirt.take(lib.checkpointGetXMLDesc(cp, flags)) else { return nil }
        return LibvirtXML.elements("disk", in: xml).first { $0.attributes["name"] == target }?.attributes["size"]
            .flatMap { UInt64($0) }
    }

    /// Deletes checkpoint `name` (only libvirt's record of it with `metadataOnly`).
    func deleteCheckpoint(_ name: String, metadataOnly: Bool = false) throws {
        guard let cp = name.withCString({ lib.checkpointLookupByName(handle, $0, 0) }) else {
            throw failure("cannot find checkpoint '\(name)'")
        }
        defer { _ = lib.checkpointFree(cp) }
        let flags = metadataOnly ? UInt32(VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY.rawValue) : 0
        guard lib.checkpointDelete(cp, flags) == 0 else { throw failure("cannot delete checkpoint '\(name)'") }
    }
}

/// Just enough XML for libvirt's documents: elements by name with their attributes and body.
/// (FoundationEssentials has no XML parser, and FoundationXML would load libxml2 for every command.)
enum LibvirtXML {
    struct Element {
        var attributes: [String: String]
        /// The text between the start and end tags ("" for an empty element).
        var body: String
    }

    /// Every element `name` in `xml`, outermost first, in document order (not nested in one another).
    static func elements(_ name: String, in xml: String) -> [Element] {
        var result: [Element] = []
        var rest = xml[...]
        let open = "<\(name)"
        while let start = rest.firstRange(of: open) {
            let after = rest[start.upperBound...]
            guard let next = after.first, next == " " || next == ">" || next == "/" || next == "\n" || next == "\t" else {
                rest = after
                continue
            }
            guard let tagEnd = after.firstIndex(of: ">") else { break }
            let tag = after[..<tagEnd]
            let selfClosing = tag.hasSuffix("/")
            let attributes = parseAttributes(selfClosing ? String(tag.dropLast()) : String(tag))
            let bodyStart = after.index(after: tagEnd)
            if selfClosing {
                result.append(Element(attributes: attributes, body: ""))
                rest = after[bodyStart...]
                continue
            }
            // The matching end tag: count nested elements of the same name.
            var depth = 1
            var cursor = bodyStart
            var bodyEnd = after.endIndex
            while depth > 0, let close = after[cursor...].firstRange(of: "</\(name)>") {
                let inner = after[cursor..<close.lowerBound]
                depth += countOpenings(open, in: inner) - 1
                if depth == 0 { bodyEnd = close.lowerBound }
                cursor = close.upperBound
            }
            result.append(Element(attributes: attributes, body: String(after[bodyStart..<bodyEnd])))
            rest = after[cursor...]
        }
        return result
    }

    private static func countOpenings(_ open: String, in text: Substring) -> Int {
        var count = 0
        var rest = text
        while let r = rest.firstRange(of: open) {
            let after = rest[r.upperBound...]
            if let c = after.first, c == " " || c == ">" || c == "\n" || c == "\t" {
                // A self-closing one does not nest.
                if let end = after.firstIndex(of: ">"), after[..<end].hasSuffix("/") {} else { count += 1 }
            }
            rest = after
        }
        return count
    }

    private static func parseAttributes(_ tag: String) -> [String: String] {
        var result: [String: String] = [:]
        var rest = tag[...]
        while let eq = rest.firstIndex(of: "=") {
            let key = rest[..<eq].split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }).last.map(String.init) ?? ""
            let afterEq = rest[rest.index(after: eq)...]
            guard let quote = afterEq.first, quote == "'" || quote == "\"" else { break }
            let valueStart = afterEq.index(after: afterEq.startIndex)
            guard let valueEnd = afterEq[valueStart...].firstIndex(of: quote) else { break }
            result[key] = unescape(String(afterEq[valueStart..<valueEnd]))
            rest = afterEq[afterEq.index(after: valueEnd)...]
        }
        return result
    }

    static func unescape(_ text: String) -> String {
        guard text.contains("&") else { return text }
        return text.replacing("&lt;", with: "<").replacing("&gt;", with: ">")
            .replacing("&apos;", with: "'").replacing("&quot;", with: "\"")
            .replacing("&amp;", with: "&")
    }

    static func escape(_ text: String) -> String {
        text.replacing("&", with: "&amp;").replacing("<", with: "&lt;")
            .replacing(">", with: "&gt;").replacing("'", with: "&apos;")
            .replacing("\"", with: "&quot;")
    }
}
